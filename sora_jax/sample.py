"""Sampling CLI; see sora_jax/generation.py and sora_jax/modes.py for the library.

  python -m sora_jax.sample --workdir=DIR --prompt="..." [--prompt=...] --width=W --height=H --frames=N \
      --out=DIR [--steps=S --guidance=G --seed=K] [--mode=t2v|t2i|i2v|v2v|extend|loop|transition|long]

  --mode=i2v --image=PATH [--image_frame=K]            animate an image (kept as frame K)
  --mode=v2v --video=PATH --strength=S                 restyle a video (0 keeps it, 1 ignores it)
  --mode=extend --video=PATH --direction=forward|backward --seconds=X
  --mode=loop                                          a clip that plays seamlessly end to end
  --mode=transition --video=A --video_end=B            from the end of A to the start of B
  --mode=long --seconds=X                              rolling extension; memory of one window
  --mode=t2i                                           one frame (--frames is ignored)
  --size=WxHxF [--size=...]                            t2v/t2i at several sizes, one per prompt (or one for all),
                                                       NaViT-packed into shared rows (seed + i per prompt)

Each result is written as MP4 + GIF (PNG for one frame) with a JSON sidecar of the whole request and seed;
the same request and seed give the same video.
"""
from __future__ import annotations

import math
import os

from absl import app, flags

from sora_jax import console
from sora_jax.config_validation import ConfigError, check_guidance_interval, round_video_size
from sora_jax.diffusion.solvers import SOLVERS
from sora_jax.generation import FIRST_FRAME, Sampler, check_request, guidance_branches, sample_to_dir, write_result
from sora_jax.modes import DIRECTIONS, GIVEN_FRAME_MODES, MODES, run_mode
from sora_jax.train import checkpointing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir (holds config.json and checkpoints).")
flags.DEFINE_multi_string("prompt", [], "Prompt; repeat for several.")
flags.DEFINE_integer("width", None, "Width in pixels (default: config.sample.width).")
flags.DEFINE_integer("height", None, "Height in pixels (default: config.sample.height).")
flags.DEFINE_integer("frames", None, "Frame count; 1 gives an image (default: config.sample.frames).")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
flags.DEFINE_integer("steps", None, "Euler steps (default: config.sample.steps).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: config.sample.guidance).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("fps", None, "Frames per second of the written MP4/GIF.")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.DEFINE_enum("mode", "t2v", list(MODES), "What to generate (see above).")
flags.DEFINE_string("image", None, "i2v: the image to animate.")
flags.DEFINE_integer("image_frame", 0, "i2v: the frame the image is kept at.")
flags.DEFINE_string("video", None, "v2v / extend / transition: the source video (transition: the first one).")
flags.DEFINE_string("video_end", None, "transition: the video to arrive at.")
flags.DEFINE_float("strength", 0.6, "v2v: how far the source is noised, in [0, 1].")
flags.DEFINE_enum("direction", "forward", list(DIRECTIONS), "extend: after the end or before the start.")
flags.DEFINE_float("seconds", None, "extend / long: seconds to generate.")
flags.DEFINE_enum("solver", None, list(SOLVERS), "ODE solver (default: config.sample.solver).")
flags.DEFINE_enum("first_frame", None, list(FIRST_FRAME), "t2v: all frames at once (joint) or the image first, then "
                  "animated (image) (default: config.sample.first_frame).")
flags.DEFINE_list("guidance_interval", None, "lo,hi: guidance (both scales) only while the noise level t is in "
                  "[lo, hi], the conditional velocity alone outside (default: config.sample.guidance_interval). "
                  "v2v starts at t = --strength: below lo it is never guided.")
flags.DEFINE_float("image_guidance", 1.0, "i2v / extend / loop / transition / long: a separate guidance scale on "
                   "the given frames (1: text guidance only).")
flags.DEFINE_multi_string("size", [], "WIDTHxHEIGHTxFRAMES per prompt (or one for all): requests of different "
                          "sizes generated together, packed into shared rows (t2v / t2i).")
console.define_verbose_flag()


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required.")
    # WORKDIR/sample.log (a temp file if the work dir is read-only or missing): orbax's restore chatter and
    # tracebacks. Sampling imports no TensorFlow, so console.quiet_native_logs() has nothing to do here.
    console.setup_logging(os.path.join(FLAGS.workdir, "sample.log"), FLAGS.verbose, create_dir=False)
    with console.reported_errors((ConfigError, FileNotFoundError)):
        _sample()


def _sample() -> None:
    """Checks the request against the run's config, then generates and writes the media."""
    config = checkpointing.read_config(FLAGS.workdir)
    s = config.sample

    def given(name, default):  # an explicit 0 is a request to check, not "use the default"
        value = getattr(FLAGS, name)
        return default if value is None else value
    width, height, frames = given("width", s.width), given("height", s.height), given("frames", s.frames)
    steps, guidance, fps = given("steps", s.steps), given("guidance", s.guidance), given("fps", s.fps)
    if not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"--guidance={guidance} must be a finite number >= 0 (1 = no guidance).")
    if fps <= 0:
        raise ConfigError(f"--fps={fps} must be a positive frame rate.")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out} is an existing file; give a directory (it is created if missing).")
    frames = 1 if FLAGS.mode == "t2i" else frames
    width, height, frames, rounded = round_video_size(config, width, height, frames)
    if rounded:
        print(rounded)
    solver = FLAGS.solver or s.get("solver", "euler")
    interval = None  # parsed and checked here, before any restore
    if FLAGS.guidance_interval is not None:
        interval = check_guidance_interval(FLAGS.guidance_interval, "--guidance_interval")
    if FLAGS.size:
        _sample_packed(config, out, steps, guidance, fps, solver, interval)
        return
    check_request(config, FLAGS.prompt, width, height, frames, steps,
                  guidance_branches(guidance, FLAGS.image_guidance, FLAGS.mode in GIVEN_FRAME_MODES))
    if FLAGS.mode in ("t2v", "t2i"):
        sampler = _restore(interval)
        _, paths = sample_to_dir(sampler, FLAGS.prompt, out, width, height, frames, steps, guidance, FLAGS.seed, fps,
                                 solver, FLAGS.first_frame or "")
        print("Wrote:\n  " + "\n  ".join(paths))
        return
    request = dict(mode=FLAGS.mode, width=width, height=height, frames=frames, fps=fps, steps=steps,
                   guidance=guidance, seed=FLAGS.seed, image=FLAGS.image, image_frame=FLAGS.image_frame,
                   video=FLAGS.video, video_end=FLAGS.video_end, strength=FLAGS.strength, direction=FLAGS.direction,
                   seconds=FLAGS.seconds, solver=solver, image_guidance=FLAGS.image_guidance)
    run_mode(None, "", request, check_only=True)  # media present, strength and lengths valid: before restoring
    sampler = _restore(interval)
    paths = []
    for i, prompt in enumerate(FLAGS.prompt):
        video = run_mode(sampler, prompt, request)
        paths += write_result(out, i, prompt, video, {**request, "guidance_interval": list(sampler.guidance_interval),
                                                       "checkpoint_step": sampler.checkpoint_step})
    print("Wrote:\n  " + "\n  ".join(paths))


def _restore(interval: tuple[float, float] | None) -> Sampler:
    """The run's sampler, with the checked --guidance_interval in place of the config's when given."""
    sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.use_ema)
    if interval is not None:
        sampler.guidance_interval = interval
    return sampler


def _parse_sizes(config) -> list[tuple[int, int, int]]:
    """--size values, one per prompt, rounded to what the model's factors divide (each rounding reported)."""
    if FLAGS.mode not in ("t2v", "t2i"):
        raise ConfigError(f"--size packs text-to-video requests; --mode={FLAGS.mode} takes --width/--height/--frames.")
    if len(FLAGS.size) not in (1, len(FLAGS.prompt)):
        raise ConfigError(f"{len(FLAGS.size)} --size values for {len(FLAGS.prompt)} prompts; give one per prompt or "
                          "one for all.")
    sizes = []
    for text in FLAGS.size:
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--size={text!r}: write WIDTHxHEIGHTxFRAMES, e.g. --size=48x32x8 (frames 1: an image).")
        width, height, frames = (int(p) for p in parts)
        frames = 1 if FLAGS.mode == "t2i" else frames
        width, height, frames, rounded = round_video_size(config, width, height, frames)
        if rounded:
            print(rounded)
        sizes.append((width, height, frames))
    return sizes * len(FLAGS.prompt) if len(sizes) == 1 else sizes


def _sample_packed(config, out: str, steps: int, guidance: float, fps: int, solver: str,
                   interval: tuple[float, float] | None) -> None:
    """Every prompt at its own size, generated together in packed rows (sora_jax/packed_sampling.py)."""
    from sora_jax.packed_sampling import generate_packed
    requests = [dict(prompt=p, width=w, height=h, frames=f, seed=FLAGS.seed + i)
                for i, (p, (w, h, f)) in enumerate(zip(FLAGS.prompt, _parse_sizes(config)))]
    for r in requests:
        check_request(config, [r["prompt"]], r["width"], r["height"], r["frames"], steps, guidance_branches(guidance))
    sampler = _restore(interval)
    videos = generate_packed(sampler, requests, steps=steps, guidance=guidance, fps=fps, solver=solver)
    paths = []
    for i, (r, video) in enumerate(zip(requests, videos)):
        request = dict(mode="t2v" if r["frames"] > 1 else "t2i", width=r["width"], height=r["height"],
                       frames=r["frames"], fps=fps, steps=steps, guidance=guidance, seed=r["seed"], solver=solver,
                       first_frame="joint", guidance_interval=list(sampler.guidance_interval), packed=True,
                       checkpoint_step=sampler.checkpoint_step)
        paths += write_result(out, i, r["prompt"], video, request)
    print("Wrote:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
    app.run(main)
