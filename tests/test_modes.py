"""Generation modes (sora_jax/modes.py) on a randomised pixel-space model: given frames come back unchanged,
each mode's output has the promised layout, bad requests are refused before anything is restored, and the
CLI writes media with a JSON sidecar. Whether a *trained* model continues motion well is measured in
BUILD_NOTES, not here."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sora_jax import generation, modes
from sora_jax.config_validation import ConfigError
from sora_jax.generation import Sampler
from sora_jax.video_io import write_mp4
from tests.conftest import ROOT, randomised_model, smoke_config

PROMPT = "a red circle moving right"
FAST = dict(steps=2, guidance=1.0, progress=False)


@pytest.fixture(scope="module")
def sampler():
    config = smoke_config()
    graphdef, params = nnx.split(randomised_model(config), nnx.Param)
    return Sampler(config, graphdef, params)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = str(root / "still.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(image)
    clips = []
    for name, shade in (("a.mp4", 40), ("b.mp4", 200)):
        frames = np.full((5, 16, 16, 3), shade, np.uint8)
        frames[:, :, :, 0] = np.arange(5)[:, None, None] * 40  # a little change per frame
        write_mp4(str(root / name), frames, 8)
        clips.append(str(root / name))
    junk = str(root / "junk.mp4")
    with open(junk, "wb") as f:
        f.write(b"not a video at all" * 10)
    return image, clips[0], clips[1], junk


def test_i2v_keeps_the_image_at_its_frame(sampler, media_files):
    image = media_files[0]
    expected = modes.read_media(image, 16, 16, 1)[0]  # covered and centre-cropped: 20x30 -> 16x16
    for k in (0, 2):
        video = modes.image_to_video(sampler, PROMPT, image, 16, 16, 4, image_frame=k, **FAST)
        assert video.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(video[k], expected)
        assert not np.array_equal(video[(k + 1) % 4], expected)  # the other frames are generated


@pytest.mark.parametrize("direction", modes.DIRECTIONS)
def test_extend_keeps_the_source_and_adds_the_seconds(sampler, media_files, direction):
    source = modes.read_media(media_files[1], 16, 16, modes.MAX_SOURCE_FRAMES, fps=8)
    video = modes.extend(sampler, PROMPT, media_files[1], 16, 16, seconds=0.25, direction=direction, fps=8, **FAST)
    assert video.shape[0] == len(source) + 2
    kept = video[:len(source)] if direction == "forward" else video[-len(source):]
    np.testing.assert_array_equal(kept, source)


@pytest.mark.parametrize("direction", modes.DIRECTIONS)
def test_extend_rolls_in_windows_each_conditioned_on_the_one_before(sampler, media_files, monkeypatch, direction):
    """An extension longer than the window rolls: 5 new frames in windows of 3 with 1 frame of context are 3
    generations (2 + 2 + 1 new), each given the latent frame of the previous window that borders the new ones
    -- the latents that window sampled, not its decode re-encoded."""
    source = modes.read_media(media_files[1], 16, 16, modes.MAX_SOURCE_FRAMES, fps=8)
    calls, made, real = [], [], modes._generate_latents

    def record(s, prompt, width, height, frames, condition, **kw):
        given = np.asarray(condition.given[0])
        calls.append((frames, int(given.sum()), kw["seed"], np.asarray(condition.latents[0])[given]))
        made.append(real(s, prompt, width, height, frames, condition, **kw))
        return made[-1]
    monkeypatch.setattr(modes, "_generate_latents", record)
    video = modes.extend(sampler, PROMPT, media_files[1], 16, 16, seconds=5 / 8, direction=direction, fps=8,
                         window=3, **FAST)
    n = len(source)
    assert video.shape[0] == n + 5
    np.testing.assert_array_equal(video[:n] if direction == "forward" else video[-n:], source)
    assert [c[:3] for c in calls] == [(3, 1, 0), (3, 1, 1), (2, 1, 2)]
    # The context of windows 2 and 3: the last (forward) or first (backward) latent frame the window before
    # sampled, exactly; and that frame's decode is where it sits in the video.
    border, borders = (-1, [n + 1, n + 3]) if direction == "forward" else (0, [3, 1])
    for call, (px, latents), index in zip(calls[1:], made, borders):
        np.testing.assert_array_equal(call[3], latents[border:][:1])
        np.testing.assert_array_equal(video[index], px[border])
        assert not np.array_equal(latents[border], modes.to_latents(sampler, px[border:][:1])[0])  # not re-encoded
    calls.clear()  # a window that holds it all: one generation, the whole extension's worth of context
    modes.extend(sampler, PROMPT, media_files[1], 16, 16, seconds=2 / 8, direction=direction, fps=8, window=4,
                 **FAST)
    assert [c[:3] for c in calls] == [(4, 2, 0)]
    calls.clear()  # by default the window is the longest clip training sees (smoke: 4 frames), context half of it
    assert modes.trained_window(sampler) == max(sampler.config.data.frames) == 4
    modes.extend(sampler, PROMPT, media_files[1], 16, 16, seconds=5 / 8, direction=direction, fps=8, **FAST)
    assert [c[:3] for c in calls] == [(4, 2, 0), (4, 2, 1), (3, 2, 2)]


def test_v2v_strength_zero_keeps_the_video_and_a_request_repeats_exactly(sampler, media_files):
    source = modes.read_media(media_files[1], 16, 16, 4, fps=8)
    kept = modes.video_to_video(sampler, PROMPT, media_files[1], 16, 16, 4, 0.0, fps=8, **FAST)
    np.testing.assert_array_equal(kept, source)
    # (How close a partial strength stays is the trained model's business; this one is random.)
    first, again = (modes.video_to_video(sampler, PROMPT, media_files[1], 16, 16, 4, 0.5, fps=8, **FAST)
                    for _ in range(2))
    assert first.shape == source.shape and not np.array_equal(first, source)
    np.testing.assert_array_equal(first, again)  # the same request and seed give the same video


def test_loop_transition_and_long_videos(sampler, media_files, capsys):
    clip = modes.loop(sampler, PROMPT, 16, 16, 4, fps=8, **FAST)
    assert clip.shape == (4, 16, 16, 3)
    steps = np.abs(np.diff(clip.astype(float), axis=0)).mean()
    seam = np.abs(clip[0].astype(float) - clip[-1]).mean()
    print(f"loop seam / typical frame step (randomised model): {seam / steps:.2f}")
    a, b = (modes.read_media(p, 16, 16, modes.MAX_SOURCE_FRAMES, fps=8) for p in media_files[1:3])
    joined = modes.transition(sampler, PROMPT, media_files[1], media_files[2], 16, 16, 3, fps=8, **FAST)
    assert joined.shape[0] == len(a) + 3 + len(b)
    np.testing.assert_array_equal(joined[:len(a)], a)
    np.testing.assert_array_equal(joined[-len(b):], b)
    windows = []
    video = modes.long_video(sampler, PROMPT, 16, 16, seconds=2.0, fps=8, window=4, context=2,
                             on_window=lambda done, wanted: windows.append(done), **FAST)
    assert video.shape == (16, 16, 16, 3) and len(windows) >= 5  # 4 frames, then 2 new per window


@pytest.mark.parametrize("keep_first", [False, True])
def test_loop_seam_is_generated_again_between_its_neighbours(sampler, monkeypatch, keep_first):
    """close_seam regenerates the k frames around the seam (n - 1 -> 0) as a transition between the frames on
    either side: the rest come back bit for bit, the window given to the model is [before, k new, after]."""
    n, k = 6, 4
    latents = np.random.default_rng(1).uniform(-1, 1, size=(n, 16, 16, 3)).astype(np.float32)  # identity AE
    seen = []
    generate = sampler.generate

    def spy(*args, condition=None, **kw):
        seen.append(condition)
        return generate(*args, condition=condition, **kw)
    monkeypatch.setattr(sampler, "generate", spy)
    out = modes.close_seam(sampler, PROMPT, latents, k, 16, 16, keep_first=keep_first, **FAST)
    end = k if keep_first else k // 2  # keep_first: what a causal VAE's loop does
    regenerated = [i for i in range(n) if i >= n - end or i < k - end]
    kept = [i for i in range(n) if i not in regenerated]
    np.testing.assert_array_equal(out[kept], latents[kept])
    assert all(not np.allclose(out[i], latents[i]) for i in regenerated)
    (condition,) = seen
    np.testing.assert_array_equal(condition.given[0], [True] + [False] * k + [True])
    np.testing.assert_array_equal(condition.latents[0, 0], latents[n - end - 1])  # the frame before the seam's
    np.testing.assert_array_equal(condition.latents[0, -1], latents[k - end])  # the frame after them


def test_bad_requests_are_refused_before_restoring(media_files, tmp_path):
    image, clip, _, junk = media_files
    base = dict(mode="i2v", width=16, height=16, frames=4, fps=8, steps=2, guidance=1.0, seed=0, image=None,
                image_frame=0, video=None, video_end=None, strength=0.5, direction="forward", seconds=None)
    cases = [({"mode": "i2v"}, "--mode=i2v needs --image"),
             ({"mode": "transition", "video": clip}, "needs --video_end"),
             ({"mode": "extend", "video": clip}, "needs --seconds"),
             ({"mode": "v2v", "video": clip, "strength": 1.5}, r"--strength=1.5 must be in \[0, 1\]"),
             ({"mode": "extend", "video": clip, "seconds": 100.0}, r"--seconds=100.0 must be in \(0, 60.0\]"),
             ({"mode": "i2v", "image": str(tmp_path / "absent.png")}, "absent.png does not exist"),
             ({"mode": "i2v", "image": junk}, "junk.mp4 cannot be used")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            modes.run_mode(None, PROMPT, {**base, **overrides}, check_only=True)
    with pytest.raises(ConfigError, match=r"--image_frame=4 must be in \[0, --frames=4\)"):
        modes.image_to_video(None, PROMPT, image, 16, 16, 4, image_frame=4)


def test_cli_writes_each_mode_with_its_request(trained_workdir, media_files, tmp_path):
    out = str(tmp_path / "out")
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sora_jax.sample", f"--workdir={trained_workdir}", f"--prompt={PROMPT}",
         "--width=16", "--height=16", "--frames=4", "--steps=2", f"--out={out}", *flags], cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    r = run("--mode=i2v", f"--image={media_files[0]}", "--image_frame=1", "--guidance_interval=0.4,1")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "000_a_red_circle_moving_right.json")) as f:
        record = json.load(f)
    assert record["mode"] == "i2v" and record["image"] == media_files[0] and record["frames_written"] == 4
    assert record["guidance_interval"] == [0.4, 1.0]
    r = run("--guidance_interval=0.9")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: --guidance_interval=['0.9']: give two numbers lo,hi with 0 <= lo <= hi <= 1, e.g. 0.5,1."), r.stderr
    assert os.path.exists(os.path.join(out, "000_a_red_circle_moving_right.mp4"))
    r = run("--mode=extend", "--seconds=1")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "error: --mode=extend needs --video.", r.stderr


def test_cli_packs_prompts_of_different_sizes(trained_workdir, tmp_path):
    out = str(tmp_path / "packed")
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sora_jax.sample", f"--workdir={trained_workdir}", f"--prompt={PROMPT}",
         "--prompt=a blue square", "--steps=2", f"--out={out}", "--seed=5", *flags], cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    r = run("--size=16x16x4", "--size=20x16x1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "24" in r.stdout and "rounded" in r.stdout.lower(), r.stdout  # 20 px is not a multiple of the patch
    records = []
    for name in ("000_a_red_circle_moving_right", "001_a_blue_square"):
        with open(os.path.join(out, name + ".json")) as f:
            records.append(json.load(f))
    assert [(x["width"], x["height"], x["frames_written"], x["seed"], x["packed"]) for x in records] == [
        (16, 16, 4, 5, True), (24, 16, 1, 6, True)]
    # the run's config.sample.solver, as unpacked sampling uses, and the one recorded
    solver = json.load(open(os.path.join(trained_workdir, "config.json")))["sample"]["solver"]
    assert [x["solver"] for x in records] == [solver] * 2
    assert os.path.exists(os.path.join(out, "000_a_red_circle_moving_right.mp4"))
    assert os.path.exists(os.path.join(out, "001_a_blue_square.png"))
    for flags_, message in ((("--size=16x16",), "WIDTHxHEIGHTxFRAMES"), (("--size=16x16x4",) * 3, "one per prompt"),
                            (("--size=16x16x4", "--mode=i2v"), "--mode=i2v takes")):
        r = run(*flags_)
        assert r.returncode == 1 and message in r.stderr.strip().splitlines()[-1], (flags_, r.stderr[-1500:])


def test_guidance_runs_both_branches_as_one_batched_call(sampler, monkeypatch):
    import jax.numpy as jnp

    from sora_jax import generation
    from sora_jax.models.dit import PackedInputs
    text, segs, pos = sampler.caption_inputs([PROMPT, "a blue square moving up"])
    n, dim = 2 * 2 * 2, 8 * 8 * 3
    inputs = PackedInputs(None, jnp.asarray(np.broadcast_to(np.stack(np.meshgrid(
        np.arange(2), np.arange(2), np.arange(2), indexing="ij"), -1).reshape(n, 3), (2, n, 3)).astype(np.int32)),
        jnp.ones((2, n), jnp.int32), jnp.ones((2, 1)), text, segs, pos, jnp.zeros((2, 1), bool),
        jnp.asarray(np.full((2, 1, 4), [8.0, 16, 16, 0.25], np.float32)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, n, dim)).astype(np.float32))
    calls = []
    real = generation.predict_velocity
    monkeypatch.setattr(generation, "predict_velocity", lambda m, i, f: calls.append(i.tokens.shape) or real(m, i, f))
    guided = np.asarray(sampler._velocity(sampler.params, inputs, x, 0.7, guidance=3.0))
    # One call over both branches; the conditional-only call is the one run outside the guidance interval.
    assert sorted(calls) == [(2, n, dim), (4, n, dim)]
    model = nnx.merge(sampler.graphdef, sampler.params)
    one = lambda drop: np.asarray(real(model, inputs._replace(  # noqa: E731
        tokens=x, t=jnp.full((2, 1), 0.7), drop_text=jnp.full((2, 1), drop)), sampler.config.flow))
    cond, uncond = one(False), one(True)
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=0, atol=1e-4)
    assert np.abs(cond - uncond).max() > 1e-3


def test_guidance_applies_only_inside_its_interval(sampler, monkeypatch):
    """config.sample.guidance_interval (lo, hi): a token whose sample's t is inside gets the guided velocity, one
    outside the conditional velocity alone. Two samples packed in one row at t = 0.7 and 0.3, interval (0.5, 1)."""
    import jax.numpy as jnp

    from sora_jax.models.dit import PackedInputs
    text, segs, pos = (np.asarray(a) for a in sampler.caption_inputs([PROMPT, "a blue square moving up"]))
    n, dim = 8, 8 * 8 * 3
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(2), np.arange(2), indexing="ij"), -1).reshape(n, 3)
    segments = np.repeat([1, 2], n // 2)[None].astype(np.int32)
    inputs = PackedInputs(
        None, jnp.asarray(grid[None].astype(np.int32)), jnp.asarray(segments), jnp.ones((1, 2)),
        jnp.asarray(np.concatenate(text)[None]), jnp.asarray(np.concatenate([segs[0], 2 * segs[1]])[None]),
        jnp.asarray(np.concatenate(pos)[None]), jnp.zeros((1, 2), bool),
        jnp.asarray(np.full((1, 2, 4), [8.0, 16, 16, 0.25], np.float32)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, n, dim)).astype(np.float32))
    t = jnp.asarray([[0.7, 0.3]])
    model = nnx.merge(sampler.graphdef, sampler.params)
    one = lambda drop: np.asarray(generation.predict_velocity(model, inputs._replace(  # noqa: E731
        tokens=x, t=t, drop_text=jnp.full((1, 2), drop)), sampler.config.flow))
    cond, uncond = one(False), one(True)
    guided = uncond + 3.0 * (cond - uncond)
    assert min(np.abs(guided - cond)[:, k:k + 4].max() for k in (0, 4)) > 1e-3  # guidance matters to each sample
    monkeypatch.setattr(sampler, "guidance_interval", (0.5, 1.0))
    got = np.asarray(sampler._velocity(sampler.params, inputs, x, t, guidance=3.0))
    np.testing.assert_allclose(got[:, :4], guided[:, :4], rtol=0, atol=1e-4)  # t = 0.7: inside, guided
    np.testing.assert_allclose(got[:, 4:], cond[:, 4:], rtol=0, atol=1e-4)  # t = 0.3: outside, conditional only
    monkeypatch.setattr(sampler, "guidance_interval", (0.0, 1.0))  # the default: guided everywhere
    np.testing.assert_allclose(np.asarray(sampler._velocity(sampler.params, inputs, x, t, guidance=3.0)), guided,
                               rtol=0, atol=1e-4)
    # The jitted path takes the interval as an array: a new interval is used, not a stale trace; lo is inclusive.
    jitted = lambda lo: np.asarray(sampler._vel(sampler.params, inputs, x, t, guidance=3.0,  # noqa: E731
                                                interval=jnp.asarray([lo, 1.0])))
    np.testing.assert_allclose(jitted(0.3), guided, rtol=0, atol=1e-4)
    np.testing.assert_allclose(jitted(0.8), cond, rtol=0, atol=1e-4)
    # Where no token is inside, the unconditional branch is not run at all: one model call of 1 row, not 2.
    ran = []
    real = generation.predict_velocity

    def counted(m, i, f):
        rows = i.tokens.shape[0]
        jax.debug.callback(lambda: ran.append(rows))  # fires only when the branch executes
        return real(m, i, f)
    monkeypatch.setattr(generation, "predict_velocity", counted)
    fresh = lambda *a, **k: sampler._velocity(*a, **k)  # noqa: E731  (a new function: no cached trace)
    monkeypatch.setattr(sampler, "_vel", jax.jit(fresh, static_argnames=("guidance", "image_guidance")))
    for lo, want in ((0.8, [1]), (0.3, [2]), (0.5, [2])):
        ran.clear()
        jitted(lo)
        jax.effects_barrier()
        assert ran == want, (lo, ran)


def test_sizes_the_factors_do_not_divide_are_rounded_by_the_documented_rule():
    from configs import wan21
    from sora_jax.config_validation import check_video_size, round_video_size
    wan = wan21.get_config("1.3B")  # latents of stride (4, 8, 8), patch (1, 2, 2): sides of 16, 1 + 4k frames
    for request, want in [((1920, 1080, 80), (1920, 1088, 81)), ((1080, 1920, 81), (1088, 1920, 81)),
                          ((2048, 2048, 1), (2048, 2048, 1)), ((1000, 563, 7), (1008, 560, 9))]:
        w, h, f, note = round_video_size(wan, *request)
        assert (w, h, f) == want, request
        assert check_video_size(wan, w, h, f)  # what it rounds to is accepted
        assert (note == "") == (want == request)
        if note:
            assert note.startswith(f"rounded {request[0]}x{request[1]}, {request[2]} frames to {w}x{h}, {f} frames")
    assert round_video_size(smoke_config(), 48, 32, 8)[:3] == (48, 32, 8)


def test_a_separate_image_guidance_is_one_call_of_three_branches(sampler, monkeypatch):
    import jax.numpy as jnp

    from sora_jax import generation
    from sora_jax.models.dit import PackedInputs
    text, segs, pos = sampler.caption_inputs([PROMPT])
    n, dim = 8, 8 * 8 * 3
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(2), np.arange(2), indexing="ij"), -1).reshape(n, 3)
    given = jnp.asarray(grid[None, :, 0] == 0)  # frame 0 given
    rng = np.random.default_rng(2)
    clean, noise = (jnp.asarray(rng.normal(size=(1, n, dim)).astype(np.float32)) for _ in range(2))
    x = jnp.where(given[..., None], clean, 0.4 * clean + 0.6 * noise)
    inputs = PackedInputs(None, jnp.asarray(grid[None].astype(np.int32)), jnp.ones((1, n), jnp.int32),
                          jnp.ones((1, 1)), text, segs, pos, jnp.zeros((1, 1), bool),
                          jnp.asarray(np.full((1, 1, 4), [8.0, 16, 16, 0.25], np.float32)), given=given)
    calls = []
    real = generation.predict_velocity
    monkeypatch.setattr(generation, "predict_velocity", lambda m, i, f: calls.append(i.tokens.shape) or real(m, i, f))
    guided = np.asarray(sampler._velocity(sampler.params, inputs, x, 0.6, 3.0, 2.0, clean, noise))
    assert sorted(calls) == [(1, n, dim), (3, n, dim)]  # three branches in one call; the conditional one alone
    model = nnx.merge(sampler.graphdef, sampler.params)
    run = lambda tokens, drop, g: np.asarray(real(model, inputs._replace(  # noqa: E731
        tokens=tokens, t=jnp.full((1, 1), 0.6), drop_text=jnp.full((1, 1), drop), given=g), sampler.config.flow))
    full, only_given = run(x, False, given), run(x, True, given)
    none = run(jnp.where(given[..., None], 0.4 * clean + 0.6 * noise, x), True, jnp.zeros_like(given))
    np.testing.assert_allclose(guided, none + 2.0 * (only_given - none) + 3.0 * (full - only_given), rtol=0, atol=1e-4)
    assert np.abs(only_given - none).max() > 1e-3  # the given frames matter to the model
    # Outside the guidance interval both scales are 1: the velocity is the full-conditioning one.
    outside = sampler._velocity(sampler.params, inputs, x, 0.6, 3.0, 2.0, clean, noise, interval=(0.7, 1.0))
    np.testing.assert_allclose(np.asarray(outside), full, rtol=0, atol=1e-4)


def test_the_memory_check_counts_every_guidance_branch(sampler, monkeypatch):
    from sora_jax import generation
    seen = []

    def record(config, prompts, tokens, pixels, branches=2):
        seen.append(branches)
        raise ConfigError("stop before generating")
    monkeypatch.setattr(generation, "check_memory", record)
    latents, given = np.zeros((1, 2, 2, 2, 3), np.float32), np.array([[True, False]])
    for guidance, image_guidance, condition in ((1.0, 1.0, None), (3.0, 1.0, None), (3.0, 2.0, None),
                                                (3.0, 1.0, generation.Condition(latents, given)),
                                                (3.0, 2.0, generation.Condition(latents, given))):
        with pytest.raises(ConfigError, match="stop before"):
            sampler.generate([PROMPT], 16, 16, 2, steps=1, guidance=guidance, image_guidance=image_guidance,
                             condition=condition, progress=False)
    assert seen == [1, 2, 2, 2, 3]
    monkeypatch.undo()
    monkeypatch.setattr(generation, "available_memory", lambda: 0)
    needs = []
    for branches in (2, 3):
        with pytest.raises(ConfigError, match=f"{branches} guidance branch") as err:
            generation.check_memory(sampler.config, 1, 10**7, 0, branches)
        needs.append(float(err.value.args[0].split("needs about ")[1].split(" GiB")[0]))
    assert needs[1] == pytest.approx(1.5 * needs[0], rel=0.01)


@pytest.mark.parametrize("solver", ["euler", "stochastic", "unipc"])
def test_requests_of_different_sizes_packed_together_equal_each_alone(sampler, solver):
    from sora_jax.packed_sampling import _pack, generate_packed
    requests = [dict(prompt=PROMPT, width=16, height=16, frames=4),
                dict(prompt="a blue square", width=24, height=16, frames=2),
                dict(prompt="a green triangle moving up", width=16, height=8, frames=1)]
    assert _pack([16, 12, 2], 16) == [[0], [1, 2]]  # first fit, largest first
    run = lambda reqs, **kw: generate_packed(sampler, reqs, steps=3, guidance=2.0, progress=False,  # noqa: E731
                                             solver=solver, **kw)
    together = run(requests, seed=3, row_tokens=16)
    assert [v.shape for v in together] == [(4, 16, 16, 3), (2, 16, 24, 3), (1, 8, 16, 3)]
    for i, request in enumerate(requests):  # request i's noise seed is seed + i unless it names its own
        alone = run([dict(request, seed=3 + i)])[0]
        assert np.abs(alone.astype(int) - together[i]).max() <= 1, i
    assert not np.array_equal(together[1][0], together[1][1])
    if solver != "euler":  # the solver is the one asked for, not Euler
        euler = generate_packed(sampler, requests, steps=3, guidance=2.0, seed=3, row_tokens=16, progress=False,
                                solver="euler")
        assert max(np.abs(a.astype(int) - b).max() for a, b in zip(euler, together)) > 2


def test_image_first_text_to_video_animates_its_own_generated_image(sampler):
    """first_frame="image": the prompt's image is generated as a 1-frame sample, then given at frame 0."""
    prompts, kw = [PROMPT, "a blue square"], dict(steps=2, guidance=2.0, seed=4, progress=False, solver="euler")
    video = sampler.generate(prompts, 16, 16, 4, first_frame="image", **kw)
    images, latents = sampler.generate(prompts, 16, 16, 1, first_frame="joint", return_latents=True, **kw)
    assert video.shape == (2, 4, 16, 16, 3) and latents.shape == (2, 1, 16, 16, 3)
    np.testing.assert_array_equal(video[:, :1], images)  # its first frame is that image
    # ...animated as image-to-video from the image's sampled latents (not its uint8 decode re-encoded)
    animated = sampler.generate(prompts, 16, 16, 4, condition=generation.given_at(latents[:, 0], 4), **kw)
    np.testing.assert_array_equal(video, animated)
    reencoded = sampler.generate(prompts, 16, 16, 4, condition=sampler.image_condition(images, 4), **kw)
    assert not np.array_equal(video, reencoded)
    joint = sampler.generate(prompts, 16, 16, 4, first_frame="joint", **kw)
    assert np.abs(joint[:, 0].astype(int) - images[:, 0]).max() > 2
    with pytest.raises(ConfigError, match="first_frame 'first'"):
        sampler.generate(prompts, 16, 16, 4, first_frame="first", **kw)
