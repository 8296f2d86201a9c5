"""The tiny pixel-space model trained on a folder of your own videos and images.

  python -m data_pipelines.prepare --videos=DIR --out=DIR/manifest.jsonl [--captions=FILE]
  python -m sora_jax.train --config=configs/tiny_videos.py:manifest=DIR/manifest.jsonl --workdir=workdirs/mine

The argument is comma-separated: `manifest=PATH` (required), optionally `eval_manifest=PATH`, `root=DIR`
and `smoke` (a few-step test run). Captions are byte-tokenised, so any language works. Clips are
sampled at 8 fps, up to 9 frames, and resized with their aspect ratio kept to at most 256 tokens of
8x8 pixels (e.g. 9 frames at 40x56, or one image at 128x128); bad files are skipped and counted.
Sampling prompts (config.sample) default to the first captions of the manifest.
"""
from configs.common import base_config, shrink_dit_for_smoke

_PATH_KEYS = ("manifest", "eval_manifest", "root")


def _parse(arg: str | None) -> tuple[dict, bool]:
    fields, smoke = {}, False
    for part in filter(None, (arg or "").split(",")):
        if part == "smoke":
            smoke = True
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in _PATH_KEYS:
            raise ValueError(f"configs/tiny_videos.py: cannot read {part!r}; use manifest=PATH[,eval_manifest=PATH]"
                             "[,root=DIR][,smoke].")
        fields[key] = value
    if "manifest" not in fields:
        raise ValueError("configs/tiny_videos.py needs manifest=PATH, e.g. --config=configs/tiny_videos.py:"
                         "manifest=DIR/manifest.jsonl (write one with `python -m data_pipelines.prepare`).")
    return fields, smoke


def get_config(arg: str | None = None):
    """arg: "manifest=PATH[,eval_manifest=PATH][,root=DIR][,smoke]"."""
    fields, smoke = _parse(arg)
    c = base_config()
    c.total_steps = 500
    c.checkpoint_every_steps = 100
    c.flow.prediction = "x0"  # pixel patches are wider than the model, as in configs/tiny.py
    c.flow.update(base_shift=4.0, max_shift=8.0)
    c.text.update(tokenizer="bytes", vocabulary=(), max_len=64)
    c.model.meta_conditioning = True  # real clips differ in frame rate and native size; let the model know
    c.eval.evaluators = ("val_loss",)  # adherence detectors judge the procedural world only
    c.data.update(source="folder", **fields)
    c.data.update(fps=8.0, clip_frames=9, max_sample_tokens=256, seq_len=512, text_len=256, num_threads=2)
    if smoke:
        shrink_dit_for_smoke(c)
        c.data.update(clip_frames=5, max_sample_tokens=48, seq_len=128, text_len=128, packing_bins=8,
                      max_samples_per_row=8, global_batch_rows=8)
        c.text.max_len = 32
        c.sample.update(steps=2, width=16, height=16, frames=2, num_prompts=0)
    return c
