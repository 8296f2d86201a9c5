"""Wan 2.1's text-to-video transformer is a configuration of our DiT: diffusers' WanTransformer3DModel and
ours, loaded from its safetensors, agree on a tiny random model.

Every weight is drawn afresh, the zero- and one-initialised ones included (the scale-shift tables, norm
scales, proj_out), so no term is trivially zero: a wrong RoPE split or pair order, a gated cross-attention,
sine-first timestep features, an unscaled timestep or a patch vector in the wrong order each move the
output 1e-2 to 1 past the 1e-4 tolerance (measured by breaking each on purpose; the clean difference is
~5e-6). The head dimension, 16, splits into 4 + 2 + 2 rotation pairs, so an even split would show too.
Options with parameters of their own (per-head QK-norm, a linear output modulation, no cross-attention
norm) fail to load instead; the wrong GELU (exact vs tanh) is caught by the per-layer test.
"""
import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from flax import nnx
from safetensors.torch import load_file, save_file

from configs import wan21
from sora_jax import patching
from sora_jax.convert.diffusers_wan import TIMESTEP_SCALE, apply_dense, load_diffusers_transformer
from sora_jax.layers.rope import split_pairs
from sora_jax.models import build_model
from sora_jax.models.dit import PackedInputs

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16, freq_dim=256,
            ffn_dim=40, num_layers=2, rope_max_seq_len=32)
# Image-to-video: 4 conditioning channels after the 4 noisy ones, 12-wide image features. diffusers' attention
# takes the last 512 context tokens as the caption, so its captions are 512 long here.
TINY_I2V = dict(TINY, in_channels=8, image_dim=12, added_kv_proj_dim=32)
VARIANTS = {"t2v": TINY, "i2v": TINY_I2V}
I2V_TEXT_LEN = 512
REL_TOL = 1e-4  # of the largest reference magnitude: float32 accumulation order, nothing more
WEIGHTS = "diffusion_pytorch_model.safetensors"


@functools.lru_cache(maxsize=None)
def _torch_wan(variant="t2v"):
    """The tiny diffusers model, float32, every parameter random."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**VARIANTS[variant]).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norm scales: around 1
            fan_in = p[0].numel() if p.ndim > 1 and "table" not in name else 4  # activations stay O(1)
            p.copy_(centre + torch.randn_like(p) / fan_in ** 0.5)
    return model


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wan"))
    _torch_wan().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wan_i2v"))
    _torch_wan("i2v").save_pretrained(path, safe_serialization=True)
    return path


def _reference(latents_cthw, timesteps, context, image=None, condition_cthw=None):
    """diffusers' forward: [B, C, T, H, W] latents, [B] timesteps on 0-1000, [B, Lt, text_dim] context; for
    image-to-video also [B, Li, image_dim] image features and [B, C_cond, T, H, W] conditioning latents."""
    variant = "t2v" if image is None else "i2v"
    if condition_cthw is not None:
        latents_cthw = np.concatenate([latents_cthw, condition_cthw], axis=1)
    image = None if image is None else torch.from_numpy(image)
    with torch.no_grad():
        out = _torch_wan(variant)(torch.from_numpy(latents_cthw), torch.from_numpy(timesteps),
                                  torch.from_numpy(context), encoder_hidden_states_image=image, return_dict=False)[0]
    return out.numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_rope_split_is_wans():
    for head_dim in (12, 16, 64, 128):
        wan = WanRotaryPosEmbed(head_dim, (1, 2, 2), 8)
        assert tuple(2 * n for n in split_pairs(head_dim)) == (wan.t_dim, wan.h_dim, wan.w_dim), head_dim


def test_dense_forward_matches_diffusers(wan_dir):
    model = load_diffusers_transformer(wan_dir, attention="xla")
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 3, 8, 8)).astype(np.float32)  # diffusers' (B, C, T, H, W)
    context = rng.normal(size=(2, 7, TINY["text_dim"])).astype(np.float32)
    timesteps = np.array([937.5, 62.5], np.float32)
    ref = _reference(latents, timesteps, context)
    assert np.abs(ref).max() > 1.0
    # The two samples really differ in their conditioning: swapping timesteps changes the output.
    assert _rel_err(_reference(latents, timesteps[::-1].copy(), context), ref) > 0.05

    out = np.asarray(apply_dense(model, jnp.asarray(latents.transpose(0, 2, 3, 4, 1)), jnp.asarray(timesteps),
                                 jnp.asarray(context)))
    assert out.shape == (2, 3, 8, 8, 4)
    err = _rel_err(out.transpose(0, 4, 1, 2, 3), ref)
    print(f"dense max relative difference {err:.2e}")
    assert err < REL_TOL
    # The same weights stacked for nnx.scan over the blocks (configs/wan21.py's layout) compute the same.
    scanned = load_diffusers_transformer(wan_dir, attention="xla", scan_layers=True)
    assert scanned.blocks.mlp.fc1.kernel.shape == (TINY["num_layers"], 32, TINY["ffn_dim"])
    out_scanned = apply_dense(scanned, jnp.asarray(latents.transpose(0, 2, 3, 4, 1)), jnp.asarray(timesteps),
                              jnp.asarray(context))
    np.testing.assert_allclose(np.asarray(out_scanned), out, rtol=0, atol=1e-5 * np.abs(out).max())


def test_gelu_layers_match_diffusers(i2v_dir):
    """The FFN, the caption projection (GELU-tanh) and the image embedder (exact GELU) alone, to a tolerance
    that tells the two GELUs apart (their difference, up to 5e-4 per activation, is near the whole-model
    tolerance after the blocks)."""
    model, wan = load_diffusers_transformer(i2v_dir, attention="xla"), _torch_wan("i2v")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 9, 32)).astype(np.float32) * 2
    caption = rng.normal(size=(1, 5, TINY["text_dim"])).astype(np.float32) * 2
    image = rng.normal(size=(1, 5, TINY_I2V["image_dim"])).astype(np.float32) * 2
    with torch.no_grad():
        ffn = wan.blocks[0].ffn(torch.from_numpy(x)).numpy()
        text = wan.condition_embedder.text_embedder(torch.from_numpy(caption)).numpy()
        image_ref = wan.condition_embedder.image_embedder(torch.from_numpy(image)).numpy()
    assert _rel_err(np.asarray(model.blocks[0].mlp(jnp.asarray(x))), ffn) < 1e-5
    assert _rel_err(np.asarray(model.text_proj(jnp.asarray(caption))), text) < 1e-5
    assert _rel_err(np.asarray(model.image_embed(jnp.asarray(image))), image_ref) < 1e-5


def _packed_row(samples, rng, text_len=20):
    """One packed row of `samples` (dicts: lat THWC, ts, caption, drop; image and cond for image-to-video),
    its padding full of noise."""
    seq_len, slots, i2v = 96, 4, "image" in samples[0]
    tokens = rng.normal(size=(1, seq_len, 16)).astype(np.float32) * 3
    positions = rng.integers(0, 9, size=(1, seq_len, 3)).astype(np.int32)
    segments, text_segments = np.zeros((1, seq_len), np.int32), np.zeros((1, text_len), np.int32)
    text = rng.normal(size=(1, text_len, TINY["text_dim"])).astype(np.float32) * 3
    text_positions = np.zeros((1, text_len), np.int32)
    cond = rng.normal(size=(1, seq_len, 16)).astype(np.float32) * 3
    image = rng.normal(size=(1, 12, TINY_I2V["image_dim"])).astype(np.float32) * 3
    image_segments = np.zeros((1, 12), np.int32)
    t = rng.uniform(size=(1, slots)).astype(np.float32)
    drop = np.ones((1, slots), bool)  # unused slots: the opposite of what the samples use, so a misread shows
    at = at_text = at_image = 0
    for k, sample in enumerate(samples):
        lat, caption = sample["lat"], sample["caption"]
        grid = patching.check_divisible(lat.shape, (1, 2, 2))
        n, nt = int(np.prod(grid)), len(caption)
        tokens[0, at:at + n], positions[0, at:at + n] = patching.patchify(lat, (1, 2, 2)), patching.positions(grid)
        segments[0, at:at + n] = k + 1
        text[0, at_text:at_text + nt], text_segments[0, at_text:at_text + nt] = caption, k + 1
        text_positions[0, at_text:at_text + nt] = np.arange(nt)
        t[0, k], drop[0, k] = sample["ts"] / TIMESTEP_SCALE, sample["drop"]
        if i2v:
            cond[0, at:at + n] = patching.patchify(sample["cond"], (1, 2, 2))
            ni = len(sample["image"])
            image[0, at_image:at_image + ni], image_segments[0, at_image:at_image + ni] = sample["image"], k + 1
            at_image += ni
        at, at_text = at + n, at_text + nt
    assert at < seq_len and at_text < text_len and at_image < image.shape[1]  # padding everywhere
    arrays = (tokens, positions, segments, t, text, text_segments, text_positions, drop)
    extra = dict(cond=jnp.asarray(cond), image=jnp.asarray(image), image_segments=jnp.asarray(image_segments))
    return PackedInputs(*(jnp.asarray(a) for a in arrays), **(extra if i2v else {})), segments[0]


def _check_each_sample(out, segments, samples):
    """Every packed sample's output equals diffusers' on that sample alone."""
    for k, sample in enumerate(samples):
        lat = sample["lat"]
        context = np.zeros_like(sample["caption"]) if sample["drop"] else sample["caption"]
        image = sample["image"][None] if "image" in sample else None
        condition = sample["cond"].transpose(3, 0, 1, 2)[None] if "cond" in sample else None
        ref = _reference(lat.transpose(3, 0, 1, 2)[None], np.array([sample["ts"]], np.float32), context[None],
                         image, condition)
        ref = ref[0].transpose(1, 2, 3, 0)  # (T, H, W, C)
        ours = patching.unpatchify(out[segments == k + 1], patching.check_divisible(lat.shape, (1, 2, 2)),
                                   (1, 2, 2), 4)
        err = _rel_err(ours, ref)
        print(f"packed sample {k} {lat.shape[:3]} max relative difference {err:.2e}")
        assert err < REL_TOL, f"sample {k} of shape {lat.shape[:3]}"


def _samples(rng, shapes, caption_lengths, timesteps, i2v=False):
    samples = []
    for k, (shape, n, ts) in enumerate(zip(shapes, caption_lengths, timesteps)):
        sample = dict(lat=rng.normal(size=shape + (4,)).astype(np.float32), ts=ts, drop=k == 1,
                      caption=rng.normal(size=(n, TINY["text_dim"])).astype(np.float32))
        if i2v:
            sample.update(cond=rng.normal(size=shape + (4,)).astype(np.float32),
                          image=rng.normal(size=(5 - 2 * k, TINY_I2V["image_dim"])).astype(np.float32))
        samples.append(sample)
    return samples


def test_packed_samples_each_match_diffusers_alone(wan_dir):
    """Three samples of different sizes, captions and timesteps in one row; the second's caption is dropped,
    which for a Wan model ("zeros" null text) means all-zero caption features."""
    model = load_diffusers_transformer(wan_dir, attention="xla")
    rng = np.random.default_rng(1)
    samples = _samples(rng, [(3, 8, 8), (1, 6, 10), (2, 4, 12)], [7, 3, 5], [937.5, 62.5, 500.0])
    inputs, segments = _packed_row(samples, rng)
    _check_each_sample(np.asarray(model(inputs))[0], segments, samples)


def test_image_to_video_matches_diffusers(i2v_dir):
    """Wan's image-to-video transformer: conditioning latents beside the noisy ones and image features that
    cross-attention reads with keys and values of their own; dense, then two samples packed in one row
    (images of 5 and 3 tokens, the second caption dropped)."""
    model = load_diffusers_transformer(i2v_dir, attention="xla")
    rng = np.random.default_rng(4)
    latents, condition = (rng.normal(size=(2, 4, 3, 8, 8)).astype(np.float32) for _ in range(2))
    context = rng.normal(size=(2, I2V_TEXT_LEN, TINY["text_dim"])).astype(np.float32)
    image = rng.normal(size=(2, 5, TINY_I2V["image_dim"])).astype(np.float32)
    timesteps = np.array([937.5, 62.5], np.float32)
    ref = _reference(latents, timesteps, context, image, condition)
    # Both image inputs really matter: other conditioning latents or other image features move the output.
    assert _rel_err(_reference(latents, timesteps, context, image, condition[::-1].copy()), ref) > 0.05
    assert _rel_err(_reference(latents, timesteps, context, image[::-1].copy(), condition), ref) > 0.05
    channels_last = lambda a: jnp.asarray(a.transpose(0, 2, 3, 4, 1))  # noqa: E731
    out = np.asarray(apply_dense(model, channels_last(latents), jnp.asarray(timesteps), jnp.asarray(context),
                                 image=jnp.asarray(image), condition=channels_last(condition)))
    err = _rel_err(out.transpose(0, 4, 1, 2, 3), ref)
    print(f"image-to-video dense max relative difference {err:.2e}")
    assert err < REL_TOL

    samples = _samples(rng, [(3, 8, 8), (1, 6, 10)], [I2V_TEXT_LEN] * 2, [937.5, 250.0], i2v=True)
    inputs, segments = _packed_row(samples, rng, text_len=2 * I2V_TEXT_LEN + 8)
    _check_each_sample(np.asarray(model(inputs))[0], segments, samples)


def _copy(src, dst, config_changes=None, weights=True):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config, **(config_changes or {})}, f)
    if weights:
        shutil.copy(os.path.join(src, WEIGHTS), dst)
    return dst


def test_sharded_and_bfloat16_checkpoints_load(wan_dir, tmp_path):
    """Sharded (with an index) and bfloat16 (as the released 14B weights are) checkpoints; a shard the index
    names but the directory lacks is an error."""
    ref = load_diffusers_transformer(wan_dir, attention="xla")
    bf16 = str(tmp_path / "bf16")
    _copy(wan_dir, bf16, weights=False)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(wan_dir, WEIGHTS)).items()},
              os.path.join(bf16, WEIGHTS))
    got = load_diffusers_transformer(bf16, param_dtype="bfloat16")
    assert got.blocks[0].attn.q.kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.blocks[0].attn.q.kernel[...], np.float32),
                                  np.asarray(ref.blocks[0].attn.q.kernel[...].astype(jnp.bfloat16), np.float32))

    sharded = str(tmp_path / "sharded")
    _torch_wan().save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    got = load_diffusers_transformer(sharded, attention="xla")
    np.testing.assert_array_equal(got.blocks[1].mlp.fc2.kernel[...], ref.blocks[1].mlp.fc2.kernel[...])
    np.testing.assert_array_equal(got.final_table[...], ref.final_table[...])
    os.remove(os.path.join(sharded, sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[-1]))
    with pytest.raises(FileNotFoundError, match="shards that are not in"):
        load_diffusers_transformer(sharded)


def test_bad_checkpoints_are_refused(wan_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'AutoencoderKLWan', not a WanTransformer3DModel"):
        load_diffusers_transformer(_copy(wan_dir, str(tmp_path / "vae"), {"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="first-last-frame"):
        load_diffusers_transformer(_copy(wan_dir, str(tmp_path / "flf2v"), {"pos_embed_seq_len": 514}))
    with pytest.raises(ValueError, match="image-to-video needs both"):
        load_diffusers_transformer(_copy(wan_dir, str(tmp_path / "i2v"), {"image_dim": 1280, "in_channels": 36}))

    # Pickle weights are refused before anything could unpickle them.
    pickled = _copy(wan_dir, str(tmp_path / "pickle"), weights=False)
    torch.save({"proj_out.bias": torch.zeros(16)}, os.path.join(pickled, "diffusion_pytorch_model.bin"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle file")
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="only pickle weights .*diffusion_pytorch_model.bin"):
        load_diffusers_transformer(pickled)

    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load_diffusers_transformer(_copy(wan_dir, str(tmp_path / "empty"), weights=False))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_diffusers_transformer(str(tmp_path / "nowhere"))

    # A config that disagrees with the weights: the first mismatching tensor, with both shapes.
    with pytest.raises(ValueError, match=r"tensor blocks\.0\.ffn\.net\.0\.proj\.bias: shape \(40,\) in "
                                         r"diffusion_pytorch_model\.safetensors but \(48,\)"):
        load_diffusers_transformer(_copy(wan_dir, str(tmp_path / "ffn"), {"ffn_dim": 48}))

    tensors = load_file(os.path.join(wan_dir, WEIGHTS))
    extra = _copy(wan_dir, str(tmp_path / "extra"), weights=False)
    save_file({**tensors, "blocks.0.attn2.add_k_proj.weight": torch.zeros(32, 8)}, os.path.join(extra, WEIGHTS))
    with pytest.raises(ValueError, match=r"tensor blocks\.0\.attn2\.add_k_proj\.weight: shape \(32, 8\) .* no such"):
        load_diffusers_transformer(extra)
    missing = _copy(wan_dir, str(tmp_path / "missing"), weights=False)
    save_file({k: v for k, v in tensors.items() if k != "blocks.1.attn1.norm_k.weight"}, os.path.join(missing, WEIGHTS))
    with pytest.raises(ValueError, match=r"lacks 1 tensors .* blocks/1/attn/k_norm/scale \(32,\)"):
        load_diffusers_transformer(missing)


@pytest.mark.parametrize("size", sorted(wan21.SIZES))
def test_config_sizes_match_diffusers(size):
    """configs/wan21.py builds (abstractly) a DiT with exactly diffusers' parameter count for each size."""
    config = wan21.get_config(size)
    model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    ours = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in WanTransformer3DModel(**wan21.SIZES[size]).parameters())
    assert ours == theirs
