"""Training on a folder of real encoded videos and images, bad files included: skips counted, data order
resumed, hosts disjoint, a different host count resumed without skipping."""
import json
import os

import numpy as np
import pytest

from configs import tiny_videos
from data_pipelines import media, pipeline
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import check_config, with_overrides
from tests.media_fixtures import make_media_folder, write_manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The fixture folder with a manifest of every good and bad file, one uncaptioned good file and one
    non-UTF-8 caption line; also a 240-line manifest (the good files over and over) for order tests."""
    root = tmp_path_factory.mktemp("media")
    info = make_media_folder(root)
    good = info["good"]
    entries = [(p, f"clip number {i}") for i, p in enumerate(good)] + [(p, "a bad file") for p in info["bad"]]
    entries.append((good[0], None))
    manifest = write_manifest(root, entries)
    with open(manifest, "ab") as f:
        f.write(b'{"path": "' + good[1].encode() + b'", "caption": "caf\xe9 latin-1"}\n')
    long = write_manifest(root, [(good[i % len(good)], f"caption {i}") for i in range(240)], name="long.jsonl")
    return {"root": root, "manifest": str(manifest), "long": str(long), **info}


def _config(manifest, **overrides):
    return with_overrides(tiny_videos.get_config(f"manifest={manifest},smoke"), **overrides)


def _expected_skips(folder) -> dict:
    counts = {r: 0 for r in media.SKIP_REASONS}
    for reason in folder["bad"].values():
        counts[reason] += 1
    counts["missing_caption"] += 1
    counts["bad_caption"] += 1
    return counts


def test_training_from_a_folder_skips_and_counts_bad_files(folder, tmp_path, caplog):
    caplog.set_level("WARNING")
    summary = train_and_evaluate(_config(folder["manifest"]), str(tmp_path / "run"))
    assert summary["step"] == 4 and np.isfinite(summary["val_loss_params"])
    expected = _expected_skips(folder)
    # Every epoch skips every bad entry once; four steps of 8 rows read the 14-line manifest several times.
    # Counts reach the trainer in the batch that follows the skip, so skips made while packing rows still in
    # flight (the packer's look-ahead, up to about one epoch here) are not counted yet: hence epochs - 2.
    epochs = summary["skipped_empty"]
    assert epochs >= 3
    for reason, n in expected.items():
        count = summary[f"skipped_{reason}"]
        assert (n == 0 and count == 0) or (count >= n * (epochs - 2) and count <= n * (epochs + 2)), (reason, summary)
    for path in folder["bad"]:
        assert path in caplog.text, f"no log line names {path}"


def test_batches_respect_the_token_budget_and_carry_metadata(folder):
    c = _config(folder["manifest"])
    batch = next(iter(pipeline.packed_dataset(c)))
    info, meta = batch["info"], batch["meta"]
    used = info[..., 3] > 0
    assert used.any()
    assert (info[..., 3][used] <= c.data.max_sample_tokens).all()
    assert (info[..., 0][used] <= c.data.clip_frames).all()
    # fps is the configured rate for videos and 0 for images; original sizes come from the files.
    fps = meta[..., 0][used]
    assert set(np.unique(fps)) <= {0.0, c.data.fps}
    sizes = {(e["height"], e["width"]) for e in folder["expected"].values()}
    assert {(int(h), int(w)) for h, w in meta[..., 1:3][used]} <= sizes
    assert batch["host_skipped"].shape == (len(media.SKIP_REASONS),)


def _positions(batches) -> list[int]:
    """Source indices of the samples in packed batches (unshuffled source: index == stream position)."""
    out = []
    for b in batches:
        info = b["info"].reshape(-1, 5)
        out += [int(i) for i in info[info[:, 3] > 0, 4]]
    return out


def test_resume_continues_the_data_order(folder):
    c = _config(folder["long"])
    straight = iter(pipeline.packed_dataset(c))
    want = [next(straight) for _ in range(4)]
    first = iter(pipeline.packed_dataset(c))
    for _ in range(2):
        next(first)
    state = first.get_state()
    resumed = iter(pipeline.packed_dataset(c))
    resumed.set_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
    for a, b in zip(want[2:], [next(resumed) for _ in range(2)]):
        for key in ("video", "info", "text", "meta"):
            np.testing.assert_array_equal(a[key], b[key])


def test_two_hosts_read_disjoint_examples(folder):
    c = _config(folder["long"], **{"data.shuffle": True})
    seen = []
    for p in range(2):
        it = iter(pipeline.packed_dataset(c, "train", p, 2))
        seen.append(set(_positions([next(it) for _ in range(2)])))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) < 240  # still within the first epoch, where the check means something


@pytest.mark.parametrize("old, new", [(2, 1), (1, 4)])
def test_resuming_on_a_different_host_count_skips_nothing(folder, old, new):
    c = _config(folder["long"], **{"data.shuffle": False})
    iters = [iter(pipeline.packed_dataset(c, "train", p, old)) for p in range(old)]
    before, untrained, per_batch = [], [], []
    for p, it in enumerate(iters):
        mine = []
        for _ in range(2 + p):  # hosts at different places, as after uneven packing
            batch = _positions([next(it)])
            mine, per_batch = mine + batch, per_batch + [len(batch)]
        before += mine
        untrained.append(next(q for q in range(p, 100_000, old) if q not in mine))  # host p's true frontier
    start = pipeline.reshard_start([it.get_state() for it in iters], 0, old)
    # Not earlier than documented: at most one partly emitted packing round (< a batch of samples) per host
    # before the slowest host's true frontier. A start of 0 (everything again) fails here.
    assert min(untrained) - old * max(per_batch) <= start <= min(untrained), (start, untrained)
    after = []
    for p in range(new):
        it = iter(pipeline.packed_dataset(c, "train", p, new, start))
        after += _positions([next(it) for _ in range(3)])
    frontier = max(before)
    missing = set(range(frontier + 1)) - set(before) - set(after)
    assert not missing, f"positions skipped by the reshard: {sorted(missing)}"
    repeated = set(before) & set(after)
    # What reshard_start documents: only positions past the slowest host's frontier come again.
    assert all(p >= start for p in repeated)


def test_mixture_of_videos_and_images(folder, tmp_path):
    videos = [p for p, e in folder["expected"].items() if e["kind"] == "video"]
    images = [p for p, e in folder["expected"].items() if e["kind"] == "image"]
    vm = write_manifest(folder["root"], [(p, "a video") for p in videos], name="videos.jsonl")
    im = write_manifest(folder["root"], [(p, "an image") for p in images], name="images.jsonl")
    c = _config(folder["manifest"], **{"data.source": "mixture", "data.mixture": (("videos", 0.7), ("images", 0.3))})
    c.data.components = {"videos": {"source": "folder", "manifest": str(vm)},
                         "images": {"source": "folder", "manifest": str(im)}}
    check_config(c)
    it = iter(pipeline.packed_dataset(c))
    info = np.concatenate([next(it)["info"].reshape(-1, 5) for _ in range(3)])
    frames = info[info[:, 3] > 0, 0]
    share = float(np.mean(frames > 1))
    assert 0.45 < share < 0.95, share  # ~70% videos (images are 1 frame)


def _first_batch_samples(c) -> np.ndarray:
    info = next(iter(pipeline.packed_dataset(c)))["info"].reshape(-1, 5)
    return info[info[:, 3] > 0]


def test_tfds_and_clip_record_sources_feed_the_packer(folder, tmp_path):
    import tfds_fixture  # as tests/test_sources.py imports it: tfds registers the builder by module name
    from data_pipelines import sources
    name = tfds_fixture.build(tmp_path / "tfds")
    c = _config(folder["manifest"], **{"data.source": "tfds", "data.tfds_name": name,
                                        "data.tfds_data_dir": str(tmp_path / "tfds")})
    assert len(_first_batch_samples(c)) > 0
    shards = sources.write_clip_records(sources.ManifestSource(folder["manifest"]), str(tmp_path / "clips"), 2)
    c = _config(folder["manifest"], **{"data.source": "records", "data.records": str(tmp_path / "clips" / "*")})
    samples = _first_batch_samples(c)
    assert len(shards) == 2 and len(samples) > 0
    assert set(samples[:, 0]) - {1}, "no video among the clip records"


def test_encode_caches_a_folder_and_training_reads_the_cache(folder, tmp_path):
    from sora_jax.encode import encode_dataset
    c = _config(folder["manifest"], **{"data.raw_source": "folder"})
    written = encode_dataset(c, str(tmp_path / "cache"), num_examples=1000, shard_size=8)
    assert len(written) == 2  # 14 manifest lines -> 2 shards of 8
    from data_pipelines.latents import LatentShards
    cache = LatentShards(str(tmp_path / "cache"))
    assert len(cache) == len(folder["good"])  # the captioned good lines; bad files and captions were skipped
    c.data.update(source="latents", latent_dir=str(tmp_path / "cache"))
    batch = next(iter(pipeline.packed_dataset(c)))
    used = batch["info"][..., 3] > 0
    assert used.any() and (batch["meta"][..., 1][used] > 0).all()  # original sizes survive the cache


def test_multiprocessing_workers_decode_resume_and_report_skips(folder):
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; the train entry point parses them
        flags.FLAGS.mark_as_parsed()
    c = _config(folder["manifest"], **{"data.workers": 2})
    it = iter(pipeline.packed_dataset(c))
    batches = [next(it) for _ in range(3)]
    assert sum(int(b["host_skipped"].sum()) for b in batches) > 0  # counted in the workers, reported here
    state = it.get_state()
    want = next(it)
    resumed = iter(pipeline.packed_dataset(c))
    resumed.set_state(state)
    got = next(resumed)
    for key in ("video", "info"):
        np.testing.assert_array_equal(want[key], got[key])
    with pytest.raises(ValueError, match="workers"):
        pipeline.reshard_start([state], 0, 1)


def test_metadata_conditioning_reaches_the_model(folder):
    import jax.numpy as jnp

    from sora_jax.models.dit import PackedInputs
    from tests.conftest import randomised_model
    c = _config(folder["manifest"])
    assert c.model.meta_conditioning
    batch = next(iter(pipeline.packed_dataset(c)))
    model = randomised_model(c)
    t = np.full(batch["info"].shape[:2], 0.5, np.float32)

    def run(meta):
        video = (jnp.asarray(batch[k]) for k in ("video", "video_pos", "video_segment_ids"))
        inputs = PackedInputs(*video, jnp.asarray(t),
                              *(jnp.asarray(batch[k]) for k in ("text", "text_segment_ids", "text_positions")),
                              jnp.zeros(t.shape, bool), meta)
        return np.asarray(model(inputs))

    doubled = batch["meta"].copy()
    doubled[..., 0] *= 2  # the same clips, labelled at twice the frame rate
    real = batch["video_segment_ids"] > 0
    assert np.abs(run(jnp.asarray(batch["meta"])) - run(jnp.asarray(doubled)))[real].max() > 1e-4
    with pytest.raises(ValueError, match="meta_conditioning"):
        run(None)


def test_a_folder_with_nothing_readable_is_a_clear_error(folder, tmp_path):
    from data_pipelines.sources import NoReadableExamples
    manifest = write_manifest(folder["root"], [(p, None) for p in folder["good"]] + [(p, "x") for p in folder["bad"]],
                              name="unusable.jsonl")
    with pytest.raises(NoReadableExamples, match="none could be used"):
        train_and_evaluate(_config(str(manifest)), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def test_a_truncated_latent_shard_is_named(folder, tmp_path):
    from data_pipelines.latents import LatentShards
    from sora_jax.encode import encode_dataset
    c = _config(folder["manifest"], **{"data.raw_source": "folder"})
    encode_dataset(c, str(tmp_path / "cache"), num_examples=1000, shard_size=8)
    shard = tmp_path / "cache" / "latents-00001-of-00002.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"shard {shard} does not open.*rerun `python -m sora_jax.encode`"):
        LatentShards(str(tmp_path / "cache"))
