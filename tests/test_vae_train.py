"""VAE training with the shared trainer: data, metrics, losses, export, and the latent DiT chain."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import vae_tiny
from data_pipelines.clips import ClipBatches, heldout_batches
from sora_jax.config_validation import ConfigError, validate_for_mesh
from sora_jax.evaluation.reconstruction import psnr, ssim
from sora_jax.losses.perceptual import VGG16_STAGES, load_perceptual_weights, perceptual_distance
from sora_jax.tasks import build_task
from sora_jax.tasks.vae import VAETask
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import check_config, with_overrides


def _smoke(**overrides):
    """The smoke VAE config on the (data 2, fsdp 2, tensor 2) mesh of the 8 test devices, with dotted overrides."""
    config = vae_tiny.get_config("smoke")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return with_overrides(config, **overrides)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """A smoke VAE run (3 steps on the 2x2x2 mesh) and its after-training export."""
    workdir = str(tmp_path_factory.mktemp("vae_run"))
    config = _smoke()
    summary = train_and_evaluate(config, workdir)
    summary.update(VAETask(config).after_training(workdir))
    return workdir, config, summary


def test_psnr_ssim_match_tensorflow():
    import tensorflow as tf
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 24, 20, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    ours = np.asarray(ssim(jnp.asarray(x), jnp.asarray(y)))
    to01 = lambda v: tf.constant(((v + 1) / 2).reshape(-1, 24, 20, 3))  # noqa: E731
    ref = tf.image.ssim(to01(x), to01(y), max_val=1.0).numpy().reshape(2, 3).mean(axis=1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    ref_psnr = tf.image.psnr(tf.constant(((x + 1) / 2).reshape(2, -1, 20, 3)),
                             tf.constant(((y + 1) / 2).reshape(2, -1, 20, 3)), max_val=1.0).numpy()
    np.testing.assert_allclose(np.asarray(psnr(jnp.asarray(x), jnp.asarray(y))), ref_psnr, rtol=1e-4)
    assert float(ssim(jnp.asarray(x), jnp.asarray(x)).min()) > 0.9999
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(jnp.zeros((1, 1, 8, 16, 3)), jnp.zeros((1, 1, 8, 16, 3)))


def test_clip_batches_mix_images_and_videos_deterministically():
    data = _smoke().data
    batch = ClipBatches(data, "train")[3]
    assert batch["video"].shape == (4, 5, 16, 16, 3) and batch["image"].shape == (4, 1, 16, 16, 3)
    assert batch["video"].dtype == np.float32 and -1 <= batch["video"].min() and batch["video"].max() <= 1
    np.testing.assert_array_equal(batch["video"], ClipBatches(data, "train")[3]["video"])
    # Two hosts' slices, stacked, are the one-host batch: the global batch does not depend on host count.
    halves = [ClipBatches(data, "train", p, 2)[3] for p in range(2)]
    for key in ("video", "image"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])
    assert not np.array_equal(heldout_batches(data, 1)[0]["video"], ClipBatches(data, "train")[0]["video"])


def test_vae_config_errors_before_compile():
    check_config(_smoke())
    cases = [
        ({"data.clip_frames": 6}, "clip_frames=6 must be 1 \\+ 4k"),
        ({"data.clip_width": 20}, "multiples of the VAE's spatial stride 8"),
        ({"data.sides": (16, 12)}, "must all be >= the crop size"),
        ({"loss.perceptual": 1.0}, "config.loss.perceptual_weights is empty: config.loss.perceptual > 0 needs"),
        ({"vae.temporal_downsample": (True,)}, "temporal_downsample has 1 entries"),
        ({"loss.l1": 0.0, "loss.l2": 0.0}, "both 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config(_smoke(**overrides))
    with pytest.raises(ConfigError, match="video_batch=6 is not divisible by the mesh's data x fsdp = 4"):
        cfg = _smoke(**{"data.video_batch": 6})
        validate_for_mesh(cfg, {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}, build_task(cfg))
    with pytest.raises(ConfigError, match="config.task='gan'"):
        check_config(_smoke(task="gan"))


def _write_lpips(path, widths=(4, 6, 8, 8, 8), seed=0):
    """A narrow VGG16-shaped LPIPS weights file with the torchvision / LPIPS tensor names."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors, cin = {}, 3
    for stage, width in zip(VGG16_STAGES, widths):
        for i in stage:
            tensors[f"features.{i}.weight"] = rng.normal(0, 0.3, (width, cin, 3, 3)).astype(np.float32)
            tensors[f"features.{i}.bias"] = rng.normal(0, 0.1, (width,)).astype(np.float32)
            cin = width
    for k, width in enumerate(widths):
        tensors[f"lin{k}.model.1.weight"] = rng.uniform(0, 1, (1, width, 1, 1)).astype(np.float32)
    save_file(tensors, path)
    return tensors


def _torch_lpips(tensors, x, y):
    """Reference LPIPS forward in PyTorch (NCHW, torch conv layout) for the same weights."""
    import torch
    import torch.nn.functional as F
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(v):
        v = (torch.from_numpy(v).permute(0, 3, 1, 2) - shift) / scale
        out = []
        for k, stage in enumerate(VGG16_STAGES):
            if k:
                v = F.max_pool2d(v, 2)
            for i in stage:
                v = F.relu(F.conv2d(v, torch.from_numpy(tensors[f"features.{i}.weight"]),
                                    torch.from_numpy(tensors[f"features.{i}.bias"]), padding=1))
            out.append(v)
        return out
    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + F.conv2d((a - b) ** 2, torch.from_numpy(tensors[f"lin{k}.model.1.weight"])).mean(dim=(1, 2, 3))
    return total.numpy()


def test_perceptual_distance_loads_local_safetensors_and_matches_torch(tmp_path):
    path = str(tmp_path / "lpips.safetensors")
    tensors = _write_lpips(path)
    weights = load_perceptual_weights(path)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 32, 48, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    ours = np.asarray(perceptual_distance(weights, jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(ours, _torch_lpips(tensors, x, y), rtol=1e-4, atol=1e-6)
    assert float(perceptual_distance(weights, jnp.asarray(x), jnp.asarray(x)).max()) < 1e-8
    # Bad files: pickle refused, missing file, missing tensor, corrupt bytes.
    with pytest.raises(ValueError, match="pickle-format file"):
        load_perceptual_weights(str(tmp_path / "vgg.pth"))
    with pytest.raises(ValueError, match="does not exist"):
        load_perceptual_weights(str(tmp_path / "missing.safetensors"))
    from safetensors.numpy import save_file
    save_file({k: v for k, v in tensors.items() if k != "lin2.model.1.weight"}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks tensor 'lin2.model.1.weight'"):
        load_perceptual_weights(str(tmp_path / "partial.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_perceptual_weights(str(tmp_path / "bad.safetensors"))


def test_adversarial_and_perceptual_terms_route_gradients(tmp_path):
    """One backward pass: the discriminator learns from the hinge loss only, the VAE from the rest."""
    from sora_jax.models.discriminator import hinge_d_loss
    path = str(tmp_path / "lpips.safetensors")
    _write_lpips(path)
    config = _smoke(**{"loss.perceptual": 0.5, "loss.perceptual_weights": path, "loss.adversarial": 0.3,
                       "loss.adv_start_step": 2, "loss.disc_channels": 4, "loss.disc_layers": 2})
    check_config(config)
    task = VAETask(config)
    model = task.build_model(nnx.Rngs(0))
    frozen = task.frozen()
    batch = {k: jnp.asarray(v) for k, v in ClipBatches(config.data, "train")[0].items()}
    key = jax.random.key(0)
    graphdef, params = nnx.split(model, nnx.Param)

    def total(params, step):
        return task.loss(nnx.merge(graphdef, params), frozen, batch, key, jnp.asarray(step))

    loss_and_grads = jax.jit(jax.value_and_grad(total, has_aux=True))  # one compile serves both steps
    (loss_on, m), grads = loss_and_grads(params, 5)
    (loss_off, m_off), grads_off = loss_and_grads(params, 0)
    assert {"l1", "kl", "perceptual", "g_adv", "d_loss", "count"} <= set(m)
    assert float(m["perceptual"]) > 0 and np.isfinite(float(loss_on))
    # Before adv_start_step the adversarial terms do not count; after, they add 0.3 g_adv + d_loss.
    np.testing.assert_allclose(float(loss_on - loss_off), float(0.3 * m["g_adv"] + m["d_loss"]), rtol=1e-5)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads_off["disc"]))
    # The discriminator's gradient equals that of the hinge loss alone (recomputed with the same posterior noise).
    kv, ki = jax.random.split(key)

    def hinge_only(disc_params):
        m2 = nnx.merge(graphdef, {**params, "disc": disc_params})
        losses = []
        for x, k in ((batch["video"], kv), (batch["image"], ki)):
            mean, logvar = m2.vae.encode_moments(x)
            rec = m2.vae.decode(mean + jnp.exp(0.5 * logvar) * jax.random.normal(k, mean.shape), clip=False)
            losses.append(hinge_d_loss(m2.disc(x), m2.disc(jax.lax.stop_gradient(rec))))
        return (losses[0] * 4 + losses[1] * 4) / 8
    expected = jax.jit(jax.grad(hinge_only))(params["disc"])
    for a, b in zip(jax.tree.leaves(grads["disc"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # ...and the VAE's gradient changes when the adversarial term switches on.
    diff = max(float(jnp.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(grads["vae"]), jax.tree.leaves(grads_off["vae"])))
    assert diff > 0


def test_vae_training_reports_psnr_ssim_and_exports(trained_vae):
    workdir, config, summary = trained_vae
    assert summary["step"] == 3
    for name in ("psnr", "ssim", "psnr_image", "ssim_image"):
        for which in ("params", "ema"):
            assert np.isfinite(summary[f"val_{name}_{which}"])
    history = json.load(open(os.path.join(workdir, "eval_history.json")))
    assert [h["step"] for h in history] == [0, 3]
    # The export is an autoencoder directory whose normalised latents are centred and unit-scaled.
    from sora_jax.models.autoencoder import VAEAutoencoder
    ae = VAEAutoencoder(summary["autoencoder_dir"])
    assert ae.channels == config.vae.z_dim and ae.stride == (4, 8, 8)
    video = ClipBatches(config.data, "train")[0]["video"]
    z = ae.encode(video)
    assert z.shape == (4, 2, 2, 2, config.vae.z_dim)
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2.0
    assert any(p.endswith(".mp4") for p in summary["reconstruction_paths"])
    assert any(p.endswith(".png") for p in summary["reconstruction_paths"])


def test_tiny_latent_dit_trains_on_cache_of_trained_vae(trained_vae, tmp_path):
    """configs/tiny_latent.py end to end: trained VAE export -> encode -> DiT on the cache -> decoded samples."""
    import shutil

    from configs import tiny_latent
    from sora_jax.encode import encode_dataset
    from sora_jax.tasks.dit import DiTTask
    _, _, summary = trained_vae
    config = tiny_latent.get_config("smoke")
    config.autoencoder.checkpoint = summary["autoencoder_dir"]
    with pytest.raises(ConfigError, match="has no manifest.json; run `python -m sora_jax.encode"):
        check_config(config)
    cache = str(tmp_path / "cache")
    config.data.latent_dir = cache
    encode_dataset(config, cache, num_examples=24, shard_size=12)
    check_config(config)
    # A cache written by another autoencoder is refused before anything compiles.
    other = str(tmp_path / "other_ae")
    shutil.copytree(summary["autoencoder_dir"], other)
    mismatched = tiny_latent.get_config("smoke")
    mismatched.autoencoder.checkpoint, mismatched.data.latent_dir = other, cache
    with pytest.raises(ConfigError, match="was encoded with autoencoder"):
        check_config(mismatched)

    workdir = str(tmp_path / "dit")
    result = train_and_evaluate(config, workdir)
    assert result["step"] == 4 and np.isfinite(result["val_loss_ema"])
    samples = DiTTask(config).after_training(workdir)
    assert len(samples["sample_paths"]) == 4  # 2 prompts x (mp4 + gif), decoded by the VAE
    import av
    mp4 = [p for p in samples["sample_paths"] if p.endswith(".mp4")][0]
    with av.open(mp4) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 24, 3)


def test_full_size_vae_config_validates_and_shards_over_fsdp(tmp_path):
    """configs/vae_wan.py: the Wan 2.1 layout, its state laid out over fsdp (abstractly: nothing allocated)."""
    from configs import vae_wan
    from sora_jax import sharding
    from sora_jax.train.state import state_spec
    config = vae_wan.get_config()
    config.mesh.update(data=1, fsdp=8)
    check_config(config)
    validate_for_mesh(config, {"data": 1, "fsdp": 8, "tensor": 1, "context": 1}, build_task(config))
    with pytest.raises(ConfigError, match="perceptual_weights='/nonexistent.safetensors' does not exist"):
        check_config(vae_wan.get_config("/nonexistent.safetensors"))
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
    params = spec.abstract["params"]
    assert sum(x.size for x in jax.tree.leaves(params["vae"])) > 100e6  # the Wan 2.1 VAE is ~127M params
    kernel = params["vae"]["decoder"]["conv_out"]["kernel"]
    assert kernel.shape == (3, 3, 3, 96, 3)  # 3 output channels do not split over 8: replicated
    mid = params["vae"]["encoder"]["mid_block"]["resnets"][0]["conv1"]["kernel"]
    assert mid.sharding.spec[-1] == "fsdp" and mid.sharding.shard_shape(mid.shape)[-1] == mid.shape[-1] // 8
    assert "disc" in params  # the adversarial term is on in the full-size recipe


def test_vae_resume_is_bitwise_identical(trained_vae, tmp_path):
    """Stop after step 2 (a copy of the run's step-2 checkpoint), resume to 3: the same state and data position."""
    import shutil

    from tests.test_train import _final_state
    workdir, config, _ = trained_vae
    split = str(tmp_path / "split")
    os.makedirs(os.path.join(split, "checkpoints"))
    shutil.copytree(os.path.join(workdir, "checkpoints", "2"), os.path.join(split, "checkpoints", "2"))
    assert train_and_evaluate(config, split)["step"] == 3
    a, data_a = _final_state(workdir, 3)
    b, data_b = _final_state(split, 3)
    assert data_a == data_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
