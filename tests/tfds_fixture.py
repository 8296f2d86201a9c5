"""A tiny TFDS dataset, built offline in array_record format, for tests of data_pipelines.sources.TfdsSource.

``build(data_dir)`` writes it (about a second) and returns its name and what each example holds.
Defining the builder class registers it with TFDS under NAME, so this module is imported once per session.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "sources_test_clips"
HEIGHT, WIDTH = 16, 24
# (frames, caption (bytes: may be invalid UTF-8), fps) per example; video frame i of example k is grey
# level 10 * k + i, so tests can tell examples and frames apart.
EXAMPLES = (
    (9, "a red ball rolls".encode(), 8.0),
    (12, "a café at night, in the rain".encode(), 16.0),
    (3, b"broken \xff caption", 8.0),
    (5, b"", 8.0),
)


def video(k: int) -> np.ndarray:
    """uint8 (T, HEIGHT, WIDTH, 3) frames of example k."""
    frames = EXAMPLES[k][0]
    return np.broadcast_to((10 * k + np.arange(frames, dtype=np.uint8))[:, None, None, None],
                           (frames, HEIGHT, WIDTH, 3)).copy()


class SourcesTestClips(tfds.core.GeneratorBasedBuilder):
    """Videos (tfds.features.Video), a still (Image), a raw uint8 clip (Tensor), caption (Text) and fps."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files beside this module.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, HEIGHT, WIDTH, 3)),
            "still": tfds.features.Image(shape=(HEIGHT, WIDTH, 3)),
            "clip": tfds.features.Tensor(shape=(None, HEIGHT, WIDTH, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "fps": np.float32,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for k, (_, caption, fps) in enumerate(EXAMPLES):
            v = video(k)
            yield k, {"video": v, "still": v[0], "clip": v, "caption": caption, "fps": fps}


def build(data_dir) -> str:
    """Prepares the dataset under data_dir in array_record format (no network); returns its name."""
    SourcesTestClips(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return NAME
