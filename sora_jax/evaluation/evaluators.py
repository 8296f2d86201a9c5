"""Evaluators of the offline evaluation job (`python -m sora_jax.evaluate`), chosen by config.eval.evaluators.

The protocol is small. EVALUATORS maps a name to a class; the job builds each selected one once,
`Evaluator(config, shared)`, which checks its config fields there (before anything is restored or
compiled) and may keep state across checkpoints (compiled functions, held-out data, real-video
statistics); `shared` is a dict all evaluators of the job see. For every checkpoint the job calls
`evaluator(ctx)` with an EvalContext and gets a Result (scalars, plus optional artifact paths and
per-item details) or a plain dict of scalars.

  val_loss        DiT: flow-matching loss on the fixed held-out batches, per timestep bucket
  adherence       DiT: samples held-out prompts and checks color, shape and motion direction
  reconstruction  VAE: PSNR / SSIM of held-out videos and images
  fid, fvd        DiT: Fréchet distances of VGG features between samples and real held-out clips
                  (NOT Inception / I3D: see sora_jax/evaluation/features.py)

This module is library code: it never imports sora_jax.train (the job module does). Generation reaches
it as ctx.generate, a function the job builds around sora_jax.generation.Sampler.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import sharding
from sora_jax.config_validation import ConfigError, check_video_size


@dataclasses.dataclass
class EvalContext:
    """What an evaluator sees for one checkpoint.

    Attributes:
      config: the run's config with the evaluation overrides.
      task: the training task (sora_jax.tasks), for its eval_metrics / frozen arrays.
      step: the checkpoint's step; which: "ema" or "params".
      graphdef, params: the model's structure and the restored parameters, sharded on `mesh`.
      mesh: the evaluation mesh (active, with the run's logical-axis rules, while evaluators run).
      frozen: the task's frozen arrays, replicated on `mesh`.
      out_dir: WORKDIR/eval/step_<N>, for artifacts (written by process 0 only).
      generate: (prompts, seed) -> uint8 videos [P, T, H, W, 3] at the evaluation's sampling settings;
        None for tasks that do not generate.
    """
    config: Any
    task: Any
    step: int
    which: str
    graphdef: Any
    params: Any
    mesh: Any
    frozen: Any
    out_dir: str
    generate: Callable[[list[str], int], np.ndarray] | None = None
    memo: dict = dataclasses.field(default_factory=dict)  # per-checkpoint results evaluators share

    def generated(self, prompts: list[str]) -> np.ndarray:
        """Videos for `prompts`, generated in batches of config.eval.sample_batch with seeds
        config.eval.seed + batch index; memoised per checkpoint, so fid and fvd share one generation."""
        key = tuple(prompts)
        if key not in self.memo:
            if self.generate is None:
                raise ConfigError(f"config.task={self.config.get('task', 'dit')!r} does not generate videos.")
            size = max(int(self.config.eval.sample_batch), 1)
            chunks = [self.generate(list(prompts[i:i + size]), int(self.config.eval.seed) + i // size)
                      for i in range(0, len(prompts), size)]
            self.memo[key] = np.concatenate(chunks)
        return self.memo[key]


@dataclasses.dataclass
class Result:
    """An evaluator's output for one checkpoint: scalars (logged), artifacts (paths), details (JSON)."""
    scalars: dict[str, float]
    artifacts: list[str] = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)


def sampling_settings(config) -> dict:
    """The evaluation's generation settings: config.eval's, where 0 means "config.sample's"."""
    e, s = config.eval, config.sample
    return dict(width=int(e.width or s.width), height=int(e.height or s.height), frames=int(e.frames or s.frames),
                steps=int(e.sample_steps or s.steps), guidance=float(e.guidance or s.guidance),
                fps=int(e.fps or s.fps))


def _is_procedural(config) -> bool:
    from data_pipelines.sources import pixel_source
    return pixel_source(config.data) == "procedural"


def _check_sampling(config, name: str) -> dict:
    settings = sampling_settings(config)
    check_video_size(config, settings["width"], settings["height"], settings["frames"], what="config.eval: ")
    if settings["steps"] <= 0:
        raise ConfigError(f"config.eval.sample_steps resolves to {settings['steps']}; {name} needs > 0.")
    return settings


def _num_batches(config) -> int:
    n = int(config.eval.batches or config.eval_batches)
    if n <= 0:
        raise ConfigError("config.eval.batches and config.eval_batches are both 0; set config.eval.batches > 0.")
    return n


def _process_index() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class ValLoss:
    """Flow-matching validation loss of the DiT, per timestep bucket, with fixed noise.

    The held-out batches are pipeline.eval_batches (config.eval.batches of them; 0: config.eval_batches),
    whose timesteps spread evenly over (0, 1). Bucket k of B maps them affinely into [k/B, (k+1)/B), so
    every bucket sees evenly spread timesteps, the same samples and the same noise (the training run's
    validation key, seed + 1 folded with the batch index). `val_loss` is the mean over buckets; with
    B = 1 it is exactly the training run's val_loss on the same batches.
    """
    tasks = ("dit",)

    def __init__(self, config, shared: dict):
        self.config = config
        self.buckets = int(config.eval.timestep_buckets)
        if self.buckets < 1:
            raise ConfigError(f"config.eval.timestep_buckets={self.buckets} must be >= 1.")
        self.num_batches = _num_batches(config)
        self._buckets = self._fn = None  # [(name, [global batch, ...]), ...] and the jitted loss, on first use

    def _compile(self, ctx: EvalContext):
        graphdef, task, frozen = ctx.graphdef, ctx.task, ctx.frozen
        base_key = jax.random.key(self.config.seed + 1)

        def loss(params, batch, index):
            key = jax.random.fold_in(base_key, index)
            return task.eval_metrics(nnx.merge(graphdef, params), frozen, batch, key)["loss"]
        return jax.jit(loss)

    def _bucket_batches(self, mesh) -> list[tuple[str, list[dict]]]:
        """The held-out batches with each bucket's timesteps, on the devices (the same for every checkpoint)."""
        from data_pipelines import pipeline
        batches = pipeline.eval_batches(self.config, self.num_batches, *_process_index())
        edges = np.linspace(0.0, 1.0, self.buckets + 1)
        return [(f"val_loss_t{lo:.2f}-{hi:.2f}",
                 [sharding.host_to_global({**b, "t": (lo + (hi - lo) * b["t"]).astype(np.float32)}, mesh)
                  for b in batches])
                for lo, hi in zip(edges[:-1], edges[1:])]

    def __call__(self, ctx: EvalContext) -> Result:
        if self._buckets is None:
            self._buckets, self._fn = self._bucket_batches(ctx.mesh), self._compile(ctx)
        losses = {name: [self._fn(ctx.params, b, np.int32(i)) for i, b in enumerate(batches)]
                  for name, batches in self._buckets}
        scalars = {name: float(np.mean(values)) for name, values in jax.device_get(losses).items()}
        scalars["val_loss"] = float(np.mean(list(scalars.values())))
        return Result(scalars)


def _write_videos(out_dir: str, names: list[str], videos: np.ndarray, fps: int) -> list[str]:
    if jax.process_index() != 0:
        return []
    from sora_jax.video_io import write_media
    paths = []
    for name, video in zip(names, videos):
        paths += write_media(out_dir, name, video, fps)
    return paths


class Adherence:
    """Prompt adherence on the procedural world: samples config.eval.num_prompts held-out prompts (cycling
    through procedural.HELD_OUT_PROMPTS) and scores the object's color (color.py), shape and initial
    motion direction (detectors.py). `adherence_all` counts samples right on all three; `adherence_whole_object`
    is the mean share of frames showing the object as one whole piece (detectors.whole_object_share). The samples are
    written to WORKDIR/eval/step_<N>/ and the per-prompt detections to details.json there."""
    tasks = ("dit",)

    def __init__(self, config, shared: dict):
        if not _is_procedural(config):
            raise ConfigError(f"the adherence evaluator scores procedural-world prompts, but config.data.source="
                              f"{config.data.source!r}; drop it from config.eval.evaluators.")
        self.config, self.settings = config, _check_sampling(config, "adherence")
        self.count = int(config.eval.num_prompts)
        if self.count <= 0:
            raise ConfigError(f"config.eval.num_prompts={self.count} must be > 0 for the adherence evaluator.")

    def __call__(self, ctx: EvalContext) -> Result:
        from data_pipelines.procedural import HELD_OUT_PROMPTS
        from sora_jax.evaluation.color import detect_color, prompt_color
        from sora_jax.evaluation.detectors import (
            DIRECTIONS,
            SHAPES,
            detect_direction,
            detect_shape,
            prompt_attribute,
            whole_object_share,
        )
        from sora_jax.video_io import slug

        prompts = [HELD_OUT_PROMPTS[i % len(HELD_OUT_PROMPTS)] for i in range(self.count)]
        videos = ctx.generated(prompts)
        moving = self.settings["frames"] > 1
        rows = []
        for prompt, video in zip(prompts, videos):
            checks = {"color": (prompt_color(prompt), detect_color(video)),
                      "shape": (prompt_attribute(prompt, SHAPES), detect_shape(video))}
            if moving:
                checks["direction"] = (prompt_attribute(prompt, DIRECTIONS), detect_direction(video))
            rows.append({"prompt": prompt, **{k: {"expected": e, "detected": d} for k, (e, d) in checks.items()},
                         "all": all(e == d for e, d in checks.values())})
        attributes = [k for k in ("color", "shape", "direction") if k in rows[0]]
        scalars = {f"adherence_{k}": float(np.mean([r[k]["expected"] == r[k]["detected"] for r in rows]))
                   for k in attributes}
        scalars["adherence_all"] = float(np.mean([r["all"] for r in rows]))
        scalars["adherence_whole_object"] = float(np.mean([whole_object_share(v) for v in videos]))
        names = [f"{i:03d}_{slug(p)}" for i, p in enumerate(prompts)]
        paths = _write_videos(ctx.out_dir, names, videos, self.settings["fps"])
        return Result(scalars, paths, {"samples": rows})


class Reconstruction:
    """PSNR and SSIM (evaluation/reconstruction.py) of the VAE on its fixed held-out clips and images
    (data_pipelines.clips.heldout_batches, config.eval.batches of them; 0: config.eval_batches), decoding
    the posterior mean. The first two held-out videos are written next to their reconstructions."""
    tasks = ("vae",)

    def __init__(self, config, shared: dict):
        self.config, self.num_batches = config, _num_batches(config)
        self._batches = self._fn = None

    @staticmethod
    def _compile(graphdef):
        from sora_jax.evaluation.reconstruction import psnr, ssim

        def scores(params, x):
            vae = nnx.merge(graphdef, params).vae
            rec = vae.decode(vae.encode(x))
            return jnp.mean(psnr(rec, x)), jnp.mean(ssim(rec, x)), rec
        return jax.jit(scores)

    def __call__(self, ctx: EvalContext) -> Result:
        from data_pipelines import clips
        if self._batches is None:
            self._batches = clips.heldout_batches(self.config.data, self.num_batches, *_process_index())
            self._fn = self._compile(ctx.graphdef)
        per_batch: dict[str, list] = {}
        first_pair = None
        for batch in self._batches:
            arrays = sharding.host_to_global({k: v for k, v in batch.items() if v.shape[0]}, ctx.mesh)
            for name, suffix in (("video", ""), ("image", "_image")):
                if name not in arrays:
                    continue
                p, s, rec = self._fn(ctx.params, arrays[name])
                per_batch.setdefault(f"psnr{suffix}", []).append(p)
                per_batch.setdefault(f"ssim{suffix}", []).append(s)
                if first_pair is None and name == "video" and rec.is_fully_addressable:
                    first_pair = (batch["video"][:2], np.asarray(rec)[:2])
        scalars = {k: float(np.mean(jax.device_get(v))) for k, v in per_batch.items()}
        paths = []
        if first_pair is not None:
            from sora_jax.video_io import to_uint8
            side_by_side = to_uint8(np.concatenate(first_pair, axis=3))  # original | reconstruction
            paths = _write_videos(ctx.out_dir, [f"reconstruction_{i}" for i in range(len(side_by_side))],
                                  side_by_side, 8)
        return Result(scalars, paths)


class Frechet:
    """Fréchet distance between features of generated samples and of real held-out clips.

    kind "fid": per-frame features (all frames of all clips); "fvd": per-clip features (frame-feature
    mean and mean absolute temporal difference). Features come from the VGG16-layout network of
    config.eval.feature_weights, NOT Inception-v3 / I3D: the values rank checkpoints and runs evaluated
    with the same weights file and are not comparable with published FID / FVD (features.py says more).
    config.eval.fid_samples real clips (heldout.py: the procedural world rendered at the sampling size)
    are featurised once per job; each checkpoint generates one sample from each real clip's caption.
    With fewer samples than feature dimensions the covariances are rank-deficient and the distance has
    a large bias: compare numbers only at equal fid_samples.
    """
    tasks = ("dit",)
    kind = ""  # "fid" or "fvd": set by the registered subclasses FID and FVD

    def __init__(self, config, shared: dict):
        from sora_jax.evaluation.features import FeatureExtractor, load_feature_weights
        kind = self.kind
        self.config, self.shared = config, shared
        self.settings = _check_sampling(config, kind)
        self.count = int(config.eval.fid_samples)
        if self.count < 2:
            raise ConfigError(f"config.eval.fid_samples={self.count}: {kind} needs at least 2 samples.")
        if kind == "fvd" and self.settings["frames"] < 2:
            raise ConfigError(f"fvd compares motion but the evaluation samples {self.settings['frames']} frame(s); "
                              "set config.eval.frames >= 2.")
        if "features" not in shared:
            try:
                weights = load_feature_weights(config.eval.feature_weights)
                shared["features"] = FeatureExtractor(weights, int(config.eval.feature_size))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.extractor = shared["features"]
        self._real = None

    def _features(self, videos: np.ndarray) -> np.ndarray:
        if self.kind == "fid":
            f = self.extractor.frames(videos)
            return f.reshape(-1, f.shape[-1])
        return self.extractor.clips(videos)

    def _real_set(self) -> tuple[list[str], tuple]:
        if "real_clips" not in self.shared:
            from sora_jax.evaluation.heldout import heldout_clips
            s = self.settings
            self.shared["real_clips"] = heldout_clips(self.config, self.count, s["width"], s["height"], s["frames"])
        if self._real is None:
            from sora_jax.evaluation.frechet import gaussian_stats
            videos, captions = self.shared["real_clips"]
            feats = self._features(videos)
            if feats.shape[0] <= feats.shape[1]:
                logging.warning("%s: %d feature vectors of dimension %d; the covariance is rank-deficient and the "
                                "distance biased (raise config.eval.fid_samples).", self.kind, *feats.shape)
            self._real = (captions, gaussian_stats(feats))
        return self._real

    def __call__(self, ctx: EvalContext) -> Result:
        from sora_jax.evaluation.frechet import frechet_distance, gaussian_stats
        captions, real_stats = self._real_set()
        generated = ctx.generated(captions)
        distance = frechet_distance(*gaussian_stats(self._features(generated)), *real_stats)
        return Result({self.kind: distance})


class FID(Frechet):
    """Fréchet distance of per-frame VGG features (see Frechet; not Inception-based FID)."""
    kind = "fid"


class FVD(Frechet):
    """Fréchet distance of per-clip VGG feature statistics (see Frechet; not I3D-based FVD)."""
    kind = "fvd"


# name -> class(config, shared); each class lists the tasks it applies to in `tasks`.
EVALUATORS: dict[str, Callable[..., Any]] = {
    "val_loss": ValLoss,
    "adherence": Adherence,
    "reconstruction": Reconstruction,
    "fid": FID,
    "fvd": FVD,
}


def build_evaluators(config) -> dict[str, Any]:
    """The evaluators config.eval.evaluators names, built (and their fields checked) in that order.

    Raises:
      ConfigError: for an unknown name, one that does not apply to config.task, or a bad field.
    """
    names = tuple(config.eval.evaluators)
    task = config.get("task", "dit")
    if not names:
        raise ConfigError(f"config.eval.evaluators is empty; choose from {sorted(EVALUATORS)}.")
    shared: dict = {}
    out = {}
    for name in names:
        if name not in EVALUATORS:
            raise ConfigError(f"config.eval.evaluators names {name!r}; choose from {sorted(EVALUATORS)}.")
        if task not in EVALUATORS[name].tasks:
            fits = sorted(n for n, cls in EVALUATORS.items() if task in cls.tasks)
            raise ConfigError(f"config.eval.evaluators: {name!r} does not apply to config.task={task!r}; "
                              f"its evaluators are {fits}.")
        out[name] = EVALUATORS[name](config, shared)
    return out


def run_evaluators(evaluators: dict, ctx: EvalContext) -> tuple[dict, list[str], dict]:
    """Runs every evaluator on one checkpoint; returns (scalars, artifact paths, details by evaluator)."""
    scalars, artifacts, details = {}, [], {}
    for name, evaluator in evaluators.items():
        out = evaluator(ctx)
        if not isinstance(out, Result):
            out = Result(dict(out))
        clash = set(out.scalars) & set(scalars)
        if clash:
            raise ValueError(f"evaluator {name!r} reports {sorted(clash)}, which another evaluator already did.")
        scalars.update({k: float(v) for k, v in out.scalars.items()})
        artifacts += out.artifacts
        if out.details:
            details[name] = out.details
    if details and jax.process_index() == 0:
        os.makedirs(ctx.out_dir, exist_ok=True)
        with open(os.path.join(ctx.out_dir, "details.json"), "w") as f:
            json.dump(details, f, indent=2)
    return scalars, artifacts, details
