"""The offline evaluation job (sora_jax.evaluate): checkpoints evaluated once, restarts, in-progress
checkpoints, evaluation meshes; its evaluators; the shape / direction detectors; the Fréchet distance."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from data_pipelines.procedural import COLORS, SHAPES, ProceduralWorld, trajectory
from sora_jax.config_validation import ConfigError
from sora_jax.evaluation import detectors
from sora_jax.evaluation.color import color_accuracy, detect_color
from sora_jax.evaluation.frechet import frechet_distance, frechet_distance_of, gaussian_stats
from sora_jax.video_io import to_uint8
from tests.conftest import ROOT, smoke_config, with_overrides

# Small generation settings for the job: the smoke config's own sample section is 16x16, 2 frames, 2 steps.
EVAL = {"eval.num_prompts": 2, "eval.sample_batch": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke DiT run's work dir (checkpoints 2 and 4), trained once for this module."""
    from sora_jax.train.loop import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    train_and_evaluate(smoke_config(**{"sample.num_prompts": 0}), workdir)  # 4 steps, checkpoints at 2 and 4
    return workdir


@pytest.fixture(scope="module")
def watched(trained):
    """The CLI entry point with --watch, run once (in a subprocess, 8 CPU devices) on the trained work dir."""
    args = [f"--workdir={trained}", "--watch", "--poll_seconds=0.2", "--timeout_seconds=300"]
    args += [f"--config.{k}={v}" for k, v in EVAL.items()]
    r = subprocess.run([sys.executable, "-m", "sora_jax.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-4000:]
    return trained, r


def _copy(workdir, dst):
    """A copy of a trained work dir without its evaluation results."""
    shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("eval"))
    return str(dst)


def _config(workdir, **overrides):
    from sora_jax.evaluate import load_config
    return with_overrides(load_config(workdir), **{**EVAL, **overrides})


def _results(workdir):
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        return json.load(f)


# --- the job ---------------------------------------------------------------------------------------------

def test_watch_evaluates_each_checkpoint_once(watched):
    workdir, run = watched
    lines = run.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines if line.startswith("eval step")] == ["eval step 2", "eval step 4"]
    assert "Evaluated 2 new checkpoint(s)" in run.stdout
    eval_dir = os.path.join(workdir, "eval")
    assert json.load(open(os.path.join(eval_dir, "evaluated.json"))) == {"steps": [2, 4]}
    results = _results(workdir)
    assert sorted(results) == ["2", "4"]
    for step in ("2", "4"):
        r = results[step]
        buckets = [f"val_loss_t{lo:.2f}-{lo + 0.25:.2f}" for lo in (0.0, 0.25, 0.5, 0.75)]
        assert all(np.isfinite(r[b]) for b in buckets)
        assert r["val_loss"] == pytest.approx(np.mean([r[b] for b in buckets]))
        for key in ("adherence_color", "adherence_shape", "adherence_direction", "adherence_all",
                    "adherence_whole_object"):
            assert 0.0 <= r[key] <= 1.0
        assert r["checkpoint_params"] == "ema"
        files = os.listdir(os.path.join(eval_dir, f"step_{step}"))
        assert sum(f.endswith(".mp4") for f in files) == 2 and "details.json" in files
        rows = json.load(open(os.path.join(eval_dir, f"step_{step}", "details.json")))["adherence"]["samples"]
        assert [r["color"]["expected"] for r in rows] == [detectors.prompt_attribute(r["prompt"], COLORS)
                                                          for r in rows]
    assert [f for f in os.listdir(eval_dir) if f.startswith("events.out.tfevents")]


def test_restart_evaluates_nothing_new(watched, capsys):
    from sora_jax.evaluate import evaluate_workdir
    workdir, _ = watched
    eval_dir = os.path.join(workdir, "eval")
    results_path = os.path.join(eval_dir, "results.json")
    before = (open(results_path).read(), os.stat(results_path).st_mtime_ns, sorted(os.listdir(eval_dir)))
    summary = evaluate_workdir(_config(workdir), workdir, watch=True, poll_seconds=0.1, timeout_seconds=60)
    assert summary["new_steps"] == [] and summary["restored"] == 0 and not summary["timed_out"]
    assert summary["evaluated_steps"] == [2, 4]
    assert (open(results_path).read(), os.stat(results_path).st_mtime_ns, sorted(os.listdir(eval_dir))) == before
    assert "Evaluated 0 new checkpoint(s)" in capsys.readouterr().out


def test_watch_skips_checkpoints_being_written(trained, tmp_path):
    """A step still in orbax's temporary directory, or without its commit marker, is passed over (and
    evaluated once finalized); the validation loss with one bucket is the training run's own."""
    from sora_jax.evaluate import evaluate_workdir
    workdir = _copy(trained, tmp_path / "run")
    ckpts = os.path.join(workdir, "checkpoints")
    os.rename(os.path.join(ckpts, "4"), os.path.join(ckpts, "4.orbax-checkpoint-tmp-123"))
    os.makedirs(os.path.join(ckpts, "6.orbax-checkpoint-tmp-123", "state"))  # a save that never finished
    os.makedirs(os.path.join(ckpts, "8", "state"))  # a step dir without commit_success.txt
    open(os.path.join(ckpts, "8", "state", "junk"), "w").write("half written")
    config = _config(workdir, **{"eval.evaluators": ("val_loss",), "eval.timestep_buckets": 1})
    out = {}

    def watch():
        from flax import nnx
        try:
            # sora_jax.layers.common turns eager sharding off at import, which flax keeps per thread.
            with nnx.use_eager_sharding(False):
                out.update(evaluate_workdir(config, workdir, watch=True, poll_seconds=0.1, timeout_seconds=300))
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e
    job = threading.Thread(target=watch)
    job.start()
    evaluated = os.path.join(workdir, "eval", "evaluated.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(evaluated) and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a few more polls that must not touch the unfinished steps
    if "error" in out:
        raise out["error"]
    assert json.load(open(evaluated)) == {"steps": [2]}
    os.rename(os.path.join(ckpts, "4.orbax-checkpoint-tmp-123"), os.path.join(ckpts, "4"))  # "finalized"
    job.join(timeout=300)
    if "error" in out:
        raise out["error"]
    assert out["new_steps"] == [2, 4] and out["in_progress"] == [6, 8] and not out["timed_out"]
    history = {h["step"]: h for h in json.load(open(os.path.join(workdir, "eval_history.json")))}
    assert _results(workdir)["4"]["val_loss"] == pytest.approx(history[4]["val_loss_ema"], rel=1e-5)

    # A run whose last step never arrives: --watch gives up after --timeout_seconds, having restored nothing.
    config.total_steps = 10
    summary = evaluate_workdir(config, workdir, watch=True, poll_seconds=0.1, timeout_seconds=0.5)
    assert summary["timed_out"] and summary["restored"] == 0 and summary["in_progress"] == [6, 8]


def test_eval_mesh_gives_the_same_val_loss(watched, tmp_path):
    """Parameters restored sharded over fsdp=2 (training used data=8) give the default mesh's losses."""
    from sora_jax.evaluate import EvalJob
    trained, _ = watched
    workdir = _copy(trained, tmp_path / "run")
    config = _config(workdir, **{"eval.evaluators": ("val_loss",), "eval.mesh.fsdp": 2})
    job = EvalJob(config, workdir)
    assert dict(job.mesh.shape)["fsdp"] == 2
    specs = [s.spec for s in jax.tree.leaves(job.spec.param_shardings)]
    assert any("fsdp" in str(spec) for spec in specs)
    job.run()
    default, fsdp = _results(trained), _results(workdir)
    for step in ("2", "4"):
        keys = [k for k in default[step] if k.startswith("val_loss")]
        assert len(keys) == 5
        for k in keys:
            assert fsdp[step][k] == pytest.approx(default[step][k], rel=1e-5, abs=1e-5), k


def test_config_errors_before_anything_is_restored(trained, tmp_path):
    from sora_jax.evaluate import EvalJob
    cases = [({"eval.evaluators": ("val_los",)}, "choose from"),
             ({"eval.evaluators": ("reconstruction",)}, "does not apply to config.task='dit'"),
             ({"eval.evaluators": ("fid",)}, "config.eval.feature_weights is empty"),
             ({"eval.evaluators": ("fvd",), "eval.feature_weights": str(tmp_path / "vgg.pth")}, "pickle"),
             ({"eval.evaluators": ("fid",), "eval.feature_weights": str(tmp_path / "none.safetensors")},
              "does not exist"),
             ({"eval.mesh.fsdp": 3}, "config.eval.mesh"),
             ({"eval.timestep_buckets": 0}, "timestep_buckets")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            EvalJob(_config(trained, **overrides), trained)
    # An override of the wrong type is refused by the command line (ml_collections' type check).
    r = subprocess.run([sys.executable, "-m", "sora_jax.evaluate", f"--workdir={trained}",
                        "--config.eval.num_prompts=many"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode != 0 and "num_prompts" in r.stderr
    # ... and so is one naming a field that does not exist, with ml_collections' suggestion.
    r = subprocess.run([sys.executable, "-m", "sora_jax.evaluate", f"--workdir={trained}",
                        "--config.eval.num_prompt=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode != 0 and 'Did you mean "num_prompts"' in r.stderr


def test_adherence_scores_true_renders_as_right(tmp_path):
    """The adherence evaluator end to end on a "model" that renders each prompt's own ground truth."""
    import dataclasses

    from data_pipelines.procedural import HELD_OUT, HELD_OUT_PROMPTS, render
    from sora_jax.evaluation.evaluators import Adherence, EvalContext
    config = with_overrides(smoke_config(), **{"eval.width": 48, "eval.height": 32, "eval.frames": 6,
                                               "eval.num_prompts": 14, "eval.sample_batch": 5})
    world = ProceduralWorld(0, (48,), (6,), "heldout")
    truth = {}
    for i, (prompt, (size, color, shape, motion, direction)) in enumerate(zip(HELD_OUT_PROMPTS, HELD_OUT)):
        p = world.params(i)  # its speed and background; the prompt's attributes; centred at the start
        vx = abs(p.vx) * (-1 if direction == "left" else 1)
        p = dataclasses.replace(p, height=32, size=size, color=color, shape=shape, motion=motion,
                                direction=direction, x0=24.0, y0=16.0, vx=vx, gravity=0.64 * (motion == "bouncing"))
        truth[prompt] = to_uint8(render(p))
    calls = []

    def generate(prompts, seed):
        calls.append((len(prompts), seed))
        return np.stack([truth[p] for p in prompts])
    ctx = EvalContext(config, None, 0, "ema", None, None, None, None, str(tmp_path), generate)
    result = Adherence(config, {})(ctx)
    assert calls == [(5, 0), (5, 1), (4, 2)]  # batches of eval.sample_batch, seed eval.seed + batch
    assert result.scalars["adherence_color"] == 1.0 and result.scalars["adherence_shape"] == 1.0
    assert result.scalars["adherence_direction"] == 1.0 and result.scalars["adherence_all"] == 1.0
    assert len([f for f in result.artifacts if f.endswith(".mp4")]) == 14
    # Mirrored "samples" move the wrong way: the direction score collapses, the others stay.
    truth = {k: v[:, :, ::-1] for k, v in truth.items()}
    mirrored = Adherence(config, {})(EvalContext(config, None, 0, "ema", None, None, None, None, str(tmp_path),
                                                 generate))
    assert mirrored.scalars["adherence_direction"] == 0.0 and mirrored.scalars["adherence_shape"] == 1.0


def test_evaluation_library_does_not_import_the_trainer():
    """Dependencies run one way: only the job module (sora_jax.evaluate) may import sora_jax.train."""
    code = ("import sys, pkgutil, importlib, sora_jax.evaluation as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module(f'sora_jax.evaluation.{m.name}')\n"
            "import data_pipelines.pipeline, data_pipelines.clips  # what the evaluators import lazily\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sora_jax.train', 'sora_jax.generation'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr[-2000:]


def _write_vgg(path, widths=(4, 8, 8, 8, 8), seed=0):
    """A narrow VGG16-shaped weights file with torchvision's tensor names."""
    from safetensors.numpy import save_file

    from sora_jax.losses.perceptual import VGG16_STAGES
    rng = np.random.default_rng(seed)
    tensors, cin = {}, 3
    for stage, width in zip(VGG16_STAGES, widths):
        for i in stage:
            scale = np.sqrt(2.0 / (9 * cin))  # He initialisation keeps activations alive through 13 layers
            tensors[f"features.{i}.weight"] = rng.normal(0, scale, (width, cin, 3, 3)).astype(np.float32)
            tensors[f"features.{i}.bias"] = np.full((width,), 0.05, np.float32)
            cin = width
    save_file(tensors, str(path))
    return str(path)


def test_fid_and_fvd(trained, tmp_path):
    from sora_jax.evaluate import evaluate_workdir
    workdir = _copy(trained, tmp_path / "run")
    weights = _write_vgg(tmp_path / "vgg.safetensors")
    config = _config(workdir, **{"eval.evaluators": ("fid", "fvd"), "eval.feature_weights": weights,
                                 "eval.fid_samples": 6, "eval.sample_batch": 3, "eval.feature_size": 32})
    summary = evaluate_workdir(config, workdir)
    assert summary["new_steps"] == [2, 4]
    for step in ("2", "4"):
        r = _results(workdir)[step]
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["fvd"]) and r["fvd"] > 0


def test_features_tell_real_clips_from_noise(tmp_path):
    """The features are not degenerate: two sets of real clips are closer than real clips and noise."""
    from sora_jax.evaluation.features import FeatureExtractor, load_feature_weights
    from sora_jax.evaluation.heldout import procedural_clips, resized_clips
    cfg = smoke_config().data
    extractor = FeatureExtractor(load_feature_weights(_write_vgg(tmp_path / "vgg.safetensors")), 32)
    real, captions = procedural_clips(cfg, 24, 32, 24, 4)
    assert real.shape == (24, 4, 24, 32, 3) and len(set(captions)) > 3
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    a, b = real[:12], real[12:]
    assert extractor.clips(a).shape == (12, 16)
    assert frechet_distance_of(extractor.clips(a), extractor.clips(b)) < frechet_distance_of(
        extractor.clips(a), extractor.clips(noise[:12]))
    frames = lambda v: extractor.frames(v).reshape(-1, 8)  # noqa: E731
    assert frechet_distance_of(frames(a), frames(b)) < frechet_distance_of(frames(a), frames(noise[:12]))
    # The generic path (any source, resized) keeps the clip count, size and captions.
    world = ProceduralWorld(0, (32, 48), (2, 6), "heldout")
    clips, names = resized_clips((world[i] for i in range(40)), 5, 32, 24, 4)
    assert clips.shape == (5, 4, 24, 32, 3) and clips.dtype == np.uint8 and len(names) == 5


def test_vae_reconstruction(tmp_path):
    """The reconstruction evaluator on a VAE checkpoint (of initial weights: no training needed) agrees with
    the VAE task's own held-out metrics."""
    from flax import nnx

    from configs import vae_tiny
    from sora_jax import sharding
    from sora_jax.evaluate import evaluate_workdir, load_config
    from sora_jax.train import checkpointing
    from sora_jax.train.state import state_spec
    config = vae_tiny.get_config("smoke")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    workdir = str(tmp_path / "vae")
    os.makedirs(workdir)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
    # Built eagerly on one device (cheaper than compiling the sharded init); the job restores it sharded.
    model = spec.task.build_model(nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt = checkpointing.Checkpointer(workdir)
    ckpt.save(2, {"step": np.int32(2), "params": params, "opt_state": spec.tx.init(params), "ema": params,
                  "lr_scale": np.float32(1.0)})
    ckpt.close()
    checkpointing.write_config(workdir, config)

    eval_config = with_overrides(load_config(workdir), **{"eval.mesh.data": 4, "eval.mesh.tensor": 2,
                                                          "eval.batches": 1})
    assert evaluate_workdir(eval_config, workdir)["new_steps"] == [2]
    r = _results(workdir)["2"]
    batch = spec.task.eval_data(0, 1)[0]
    expected = spec.task.eval_metrics(model, {}, {k: jax.numpy.asarray(v) for k, v in batch.items()}, None)
    for k in ("psnr", "ssim", "psnr_image", "ssim_image"):
        assert r[k] == pytest.approx(float(expected[k]), rel=1e-4), k
    assert [f for f in os.listdir(os.path.join(workdir, "eval", "step_2")) if f.endswith(".mp4")]


# --- detectors -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renders():
    """Procedural renders (32-48 px, 4-8 frames) of training and held-out combinations, with ground truth."""
    out = []
    for split in ("train", "heldout"):
        world = ProceduralWorld(3, (32, 40, 48), (4, 6, 8), split)
        out += [(to_uint8(s["video"]), s["params"]) for s in (world[i] for i in range(90))]
    return out


def test_shape_detector_on_renders(renders):
    hits = {shape: [] for shape in SHAPES}
    for video, p in renders:
        hits[p.shape].append(detectors.detect_shape(video) == p.shape)
        assert detectors.detect_shape(video[:, :, ::-1]) == detectors.detect_shape(video)  # mirror-invariant
    for shape, h in hits.items():
        assert len(h) >= 20 and np.mean(h) >= 0.9, (shape, np.mean(h))
    videos, prompts = [v for v, _ in renders], [p.caption for _, p in renders]
    assert detectors.shape_accuracy(videos, prompts)["shape_accuracy"] >= 0.9
    # The metric catches wrong shapes: the same videos scored against prompts naming another shape.
    wrong = [c.replace(p.shape, SHAPES[(SHAPES.index(p.shape) + 1) % 3]) for c, (_, p) in zip(prompts, renders)]
    assert detectors.shape_accuracy(videos, wrong)["shape_accuracy"] <= 0.1


def test_shape_detector_survives_blur_and_noise(renders):
    """Generated objects come out soft: a 1 px Gaussian blur plus noise must not change the detected shape (by
    fill ratio alone, 41% of blurred triangles read as circles), and a circle must not turn into a triangle."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    hits = {shape: [] for shape in SHAPES}
    for video, p in renders[:120]:
        soft = ndimage.gaussian_filter(video.astype(np.float32), (0, 1.0, 1.0, 0))
        soft = np.clip(soft + rng.normal(0.0, 12.0, soft.shape), 0, 255).astype(np.uint8)
        hits[p.shape].append(detectors.detect_shape(soft) == p.shape)
    for shape, h in hits.items():
        assert len(h) >= 20 and np.mean(h) >= 0.9, (shape, np.mean(h))
    # The triangle statistic itself: a symmetric shape has no vertical skew, a triangle ~0.566.
    square = np.pad(np.ones((10, 10)), 5)
    triangle = np.tril(np.ones((20, 20)))[::-1] * 1.0
    assert abs(detectors.vertical_skew(square)) < 1e-6 and abs(abs(detectors.vertical_skew(triangle)) - 0.566) < 0.05


def test_direction_detector_on_renders(renders):
    moving = [(v, p) for v, p in renders if p.direction]
    videos, prompts = [v for v, _ in moving], [p.caption for _, p in moving]
    assert len(moving) >= 150
    assert detectors.direction_accuracy(videos, prompts)["direction_accuracy"] >= 0.9
    for video, p in moving:
        # Exactly the rendered start of the motion (a bounce in the first frame reverses the prompt's).
        first_move = np.diff(trajectory(p)[:, 0])[0]
        assert detectors.detect_direction(video) == ("right" if first_move > 0 else "left")
    # A broken video -- mirrored -- flips every detected direction, and the metric drops accordingly.
    mirrored = [v[:, :, ::-1] for v in videos]
    assert all(detectors.detect_direction(m) != detectors.detect_direction(v) for m, v in zip(mirrored, videos))
    assert detectors.direction_accuracy(mirrored, prompts)["direction_accuracy"] <= 0.1
    # A still frame has no direction.
    assert detectors.detect_direction(videos[0][:1]) == "none"


def test_color_detector_on_renders(renders):
    videos, prompts = [v for v, _ in renders], [p.caption for _, p in renders]
    assert color_accuracy(videos, prompts)["color_accuracy"] >= 0.9
    assert {p.color for _, p in renders} == set(COLORS)
    assert all(detect_color(v[:, :, ::-1]) == detect_color(v) for v in videos[:20])


def test_detectors_on_empty_frames():
    blank = np.full((3, 32, 32, 3), 30, np.uint8)
    assert detectors.detect_shape(blank) == "none" and detectors.detect_direction(blank) == "none"


# --- Fréchet distance ------------------------------------------------------------------------------------------

def _reference_frechet(mu1, s1, mu2, s2):
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_matches_scipy_reference():
    rng = np.random.default_rng(0)
    for dim in (1, 4, 16):
        a = rng.normal(size=(400, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
        b = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim))
        stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
        assert frechet_distance(*stats_a, *stats_b) == pytest.approx(_reference_frechet(*stats_a, *stats_b), rel=1e-6)
        assert frechet_distance_of(a, b) == pytest.approx(frechet_distance(*stats_a, *stats_b))
        np.testing.assert_allclose(stats_a[1], np.cov(a, rowvar=False).reshape(dim, dim))


def test_frechet_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-8)  # identical distributions
    shift = rng.normal(size=8)
    assert frechet_distance_of(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)  # |mu1 - mu2|^2
    # Diagonal covariances: |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_rank_deficient_and_bad_input():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(5, 32))  # fewer samples than dimensions: singular covariances
    d = frechet_distance_of(few, rng.normal(size=(6, 32)) + 1.0)
    stats = [gaussian_stats(few), gaussian_stats(rng.normal(size=(6, 32)) + 1.0)]
    assert np.isfinite(d) and d > 0
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(
        _reference_frechet(*stats[0], *stats[1]), rel=1e-4)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(few[:1])
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_whole_object_detector_on_renders_and_fragments(renders):
    videos = [v for v, _ in renders]
    assert detectors.whole_object_accuracy(videos)["whole_object_share"] >= 0.95
    # The failure the issue describes: the object cut into 8x8 patches, some moved across the frame.
    broken = []
    for video in videos[:40]:
        v = video.copy()
        h, w = v.shape[1:3]
        v[:, :, w // 2:] = np.roll(v[:, :, w // 2:], h // 2, axis=1)  # the right half shifted down by half a frame
        v[:, :, : w // 2] = np.roll(v[:, :, : w // 2], -w // 4, axis=2)
        broken.append(v)
    whole_before = np.mean([detectors.whole_object_share(v) for v in videos[:40]])
    whole_after = np.mean([detectors.whole_object_share(v) for v in broken])
    assert whole_after < whole_before - 0.2, (whole_before, whole_after)
    two = np.full((2, 32, 32, 3), 30, np.uint8)
    two[:, 4:10, 4:10] = (220, 40, 40)
    two[:, 20:26, 20:26] = (220, 40, 40)
    assert detectors.whole_object_share(two) == 0.0  # two pieces
    assert detectors.whole_object_share(two[:, :16, :16]) == 1.0  # one of them alone
    assert detectors.whole_object_share(np.full((2, 32, 32, 3), 30, np.uint8)) == 0.0  # nothing there
