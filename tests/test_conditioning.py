"""Per-token conditioning: which tokens each training task gives, how the model treats given tokens, and the
loss that scores only the generated ones (sora_jax/diffusion/tasks.py, PackedInputs.given)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from sora_jax.config_validation import ConfigError, validate_dit
from sora_jax.diffusion import tasks
from sora_jax.diffusion.flow import flow_loss
from sora_jax.models.dit import PackedInputs
from tests.conftest import randomised_model, smoke_config, with_overrides


@functools.lru_cache(maxsize=1)
def _batch():
    config = smoke_config(**{"model.meta_conditioning": True, "model.pooled_text": True})
    first = next(iter(pipeline.packed_dataset(config)))
    return config, {k: np.asarray(v) for k, v in first.items() if not k.startswith("host_")}


def _only(name):
    return np.eye(len(tasks.TASKS))[tasks.TASKS.index(name)]


def _given(name, seed=0):
    _, batch = _batch()
    given, task = tasks.given_tokens(jax.random.key(seed), _only(name), batch["video_pos"][..., 0],
                                     batch["video_segment_ids"], batch["info"][..., 0])
    return np.asarray(given), np.asarray(task)


def _samples():
    """(row, segment id, token mask, latent frame count) of every real sample."""
    _, batch = _batch()
    for r in range(len(batch["video"])):
        for s in range(1, int((batch["info"][r, :, 3] > 0).sum()) + 1):
            yield r, s, batch["video_segment_ids"][r] == s, int(batch["info"][r, s - 1, 0])


@pytest.mark.parametrize("name", tasks.TASKS)
def test_each_task_gives_the_frames_it_names(name):
    _, batch = _batch()
    frames = batch["video_pos"][..., 0]
    assert any(nt > 2 for *_, nt in _samples()) and any(nt == 1 for *_, nt in _samples())
    for seed in range(3):
        given, _ = _given(name, seed)
        assert not given[batch["video_segment_ids"] == 0].any()  # padding is never given
        for r, s, mask, nt in _samples():
            got = sorted({int(f) for f in frames[r][mask & given[r]]})
            # every frame is given whole, or not at all
            assert all(given[r][mask & (frames[r] == f)].all() for f in got)
            if nt == 1 or name == "t2v":
                assert got == [], (name, nt, got)
                continue
            assert len(got) < nt, (name, nt, got)  # something is left to generate
            if name == "i2v_first":
                assert got == [0]
            elif name == "i2v_any":
                assert len(got) == 1
            elif name == "forward":
                assert got == list(range(len(got))) and got
            elif name == "backward":
                assert got == list(range(nt - len(got), nt)) and got
            elif name == "first_last":
                assert got == ([0, nt - 1] if nt > 2 else [0])
            elif name == "keyframes":
                assert got and len({b - a for a, b in zip(got, got[1:])}) <= 1  # a regular stride


def test_mixed_weights_draw_every_task_in_proportion():
    _, batch = _batch()
    mixed = with_overrides(smoke_config(), **{"flow.tasks.t2v": 1.0, "flow.tasks.forward": 3.0})
    weights = tasks.task_weights(mixed.flow)
    assert weights[0] == pytest.approx(0.25) and weights[tasks.TASKS.index("forward")] == pytest.approx(0.75)
    multi = batch["info"][..., 0] > 1
    drawn = np.concatenate([np.asarray(tasks.given_tokens(jax.random.key(i), weights, batch["video_pos"][..., 0],
                                                          batch["video_segment_ids"], batch["info"][..., 0])[1])[multi]
                            for i in range(40)])
    assert set(drawn.tolist()) == {0, tasks.TASKS.index("forward")}
    assert np.mean(drawn == tasks.TASKS.index("forward")) == pytest.approx(0.75, abs=0.1)
    assert tasks.task_weights(smoke_config().flow) is None  # text-to-video only: the old graph, unchanged


def test_bad_task_weights_are_refused():
    for overrides, message in [({"flow.tasks.t2v": -1.0}, "must be >= 0"),
                               ({"flow.tasks.t2v": 0.0}, "not all zero")]:
        with pytest.raises(ConfigError, match=message):
            validate_dit(with_overrides(smoke_config(), **overrides))


@functools.lru_cache(maxsize=1)
def _model_fn():
    config, _ = _batch()
    graphdef, state = nnx.split(randomised_model(config))
    return jax.jit(lambda inputs: nnx.merge(graphdef, state)(inputs))


def _inputs(t, given=None):
    _, batch = _batch()
    rows, slots = batch["info"].shape[:2]
    return PackedInputs(jnp.asarray(batch["video"]), jnp.asarray(batch["video_pos"]),
                        jnp.asarray(batch["video_segment_ids"]), jnp.asarray(t), jnp.asarray(batch["text"]),
                        jnp.asarray(batch["text_segment_ids"]), jnp.asarray(batch["text_positions"]),
                        jnp.zeros((rows, slots), bool), jnp.asarray(batch["meta"]),
                        given=None if given is None else jnp.asarray(given))


def test_given_tokens_are_modulated_as_at_t_zero():
    """All of a sample given = that sample at t = 0; nothing given = no mask at all; a partial mask is neither."""
    _, batch = _batch()
    forward = _model_fn()
    rows, slots = batch["info"].shape[:2]
    t = np.random.default_rng(0).uniform(0.2, 0.9, (rows, slots)).astype(np.float32)
    plain = np.asarray(forward(_inputs(t)))
    np.testing.assert_array_equal(np.asarray(forward(_inputs(t, np.zeros_like(batch["video_segment_ids"], bool)))),
                                  plain)
    whole = batch["video_segment_ids"] == 1  # every row's first sample given entirely
    t0 = t.copy()
    t0[:, 0] = 0.0
    real = batch["video_segment_ids"] > 0  # padding reads sample 0's modulation: unspecified, never scored
    np.testing.assert_allclose(np.asarray(forward(_inputs(t, whole)))[real], np.asarray(forward(_inputs(t0)))[real],
                               rtol=0, atol=1e-5)
    given, _ = _given("i2v_first")
    partial = np.asarray(forward(_inputs(t, given)))
    assert np.abs(partial - plain)[real & ~given].max() > 1e-3  # the generated tokens see their context change


def test_the_loss_scores_only_generated_tokens_and_gets_given_ones_clean():
    config, batch = _batch()
    config = with_overrides(config, **{"flow.tasks.t2v": 0.0, "flow.tasks.forward": 1.0})
    seen = {}

    def model(inputs):
        seen["inputs"] = inputs
        return jnp.zeros_like(inputs.tokens)
    key = jax.random.key(5)
    loss, aux = flow_loss(model, batch, key, config.flow, 0.0, tasks=True)
    inputs = seen["inputs"]
    given = np.asarray(inputs.given)
    expected, _ = tasks.given_tokens(jax.random.fold_in(key, 7), tasks.task_weights(config.flow),
                                     batch["video_pos"][..., 0], batch["video_segment_ids"], batch["info"][..., 0])
    np.testing.assert_array_equal(given, np.asarray(expected))
    assert given.any() and (~given & (batch["video_segment_ids"] > 0)).any()
    np.testing.assert_array_equal(np.asarray(inputs.tokens)[given], batch["video"][given])  # clean
    # The loss is the mean squared velocity error over the generated tokens alone.
    t = np.asarray(jax.vmap(lambda ti, s: ti[jnp.clip(s - 1, 0)])(inputs.t, inputs.segments))[..., None]
    xt = np.asarray(inputs.tokens)
    gen = ~given & (batch["video_segment_ids"] > 0)
    noise = (xt - (1 - t) * batch["video"]) / t
    assert config.flow.prediction == "x0"  # a zero output predicts x0 = 0: the velocity is x_t / t
    pred = xt / np.maximum(t, config.flow.t_min)
    want = np.mean(np.square(pred - (noise - batch["video"]))[gen])
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(aux["real_tokens"]) == (batch["video_segment_ids"] > 0).sum()
    # The held-out loss stays text to video.
    flow_loss(model, batch, key, config.flow, 0.0)
    assert seen["inputs"].given is None
