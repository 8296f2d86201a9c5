"""End to end: our Wan text-to-video sampling (umT5 + Wan DiT + Wan VAE + flow-matching Euler) against
diffusers' WanPipeline on one tiny random pipeline directory, from the same initial noise.

Every part is random at a scale where it matters: the umT5 with off-one norm scales and large relative-
position biases, every DiT weight drawn afresh (zero-initialised tables and output projection included),
the VAE's weights perturbed and its latents_mean / latents_std far from 0 / 1. The tokenizer appends
</s>, as umT5's does, so the caption length that decides the zeroed text features counts it.
Nothing is downloaded: the tokenizer is a word-level one built here.
"""
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from sora_jax.diffusion.solvers import unipc_sample
from sora_jax.wan_pipeline import Scheduler, WanTextToVideo, clean_prompt, flow_match_sigmas, unipc_flow_sigmas

WORDS = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
TEXT_DIM = 32
UMT5 = dict(vocab_size=100, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0)
WAN = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=TEXT_DIM,
           freq_dim=256, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
# Wan 2.1's layout (4x8x8 compression), narrow: 9 frames of 32x32 -> 3x4x4 latents -> 3x2x2 DiT tokens.
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], latents_mean=[0.3, -0.5, 0.1, 0.8],
           latents_std=[1.7, 0.6, 2.5, 1.1])
SHIFT = 3.0
# The scheduler the released Wan 2.1 checkpoints ship (their scheduler_config.json), at our test's shift.
WAN_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT, num_train_timesteps=1000,
                 solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
REQUEST = dict(prompt="w3 w14  w15 w9 w26", negative_prompt="w5 w35", height=32, width=32, num_frames=9,
               num_inference_steps=3, guidance_scale=5.0, max_sequence_length=64)
# 64 text positions, not the default 512: the zero rows past a caption dilute its part in cross-attention by
# the sequence length, and with 512 a change of guidance or prompt would move this random model's video by
# only ~1e-2. The default length runs in test_shift_and_guidance_off_match_too.
ATOL = 5e-5  # on [0, 1] pixels; see test_matches_diffusers_wan_pipeline


def _tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def _randomise(module, rule):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(rule(name, p))


def _umt5_rule(name, p):
    if "relative_attention_bias" in name:  # large and distinct per layer
        return 3.0 * torch.randn_like(p)
    if "layer_norm" in name:  # off 1.0, so a dropped norm scale shows
        return 1.0 + 0.3 * torch.randn_like(p)
    return p


def _wan_rule(name, p):
    centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
    fan_in = p[0].numel() if p.ndim > 1 and "table" not in name else 4  # activations stay O(1)
    return centre + torch.randn_like(p) / fan_in ** 0.5


def _pipeline():
    torch.manual_seed(0)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval()
    _randomise(text_encoder, _umt5_rule)
    transformer = WanTransformer3DModel(**WAN).eval()
    _randomise(transformer, _wan_rule)
    vae = AutoencoderKLWan(**VAE).eval()
    _randomise(vae, lambda name, p: p + 0.05 * torch.randn_like(p))
    return WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(diffusers pipeline, its saved directory, our pipeline loaded from it)."""
    pipe = _pipeline()
    path = str(tmp_path_factory.mktemp("wan_pipeline"))
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path, WanTextToVideo.from_pretrained(path, attention="xla")


def _noise(seed=0):
    """Initial latents in diffusers' layout [B, C, T', H', W']."""
    return np.random.default_rng(seed).normal(size=(1, 4, 3, 4, 4)).astype(np.float32)


def _diffusers(pipe, latents, **overrides):
    request = dict(REQUEST, **overrides)
    with torch.no_grad():
        return pipe(**request, latents=torch.from_numpy(latents), output_type="np").frames


def test_sigma_schedule_is_diffusers():
    for steps, shift in [(1, 1.0), (3, SHIFT), (50, 5.0)]:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps)
        np.testing.assert_allclose(flow_match_sigmas(steps, shift), scheduler.sigmas.numpy(), rtol=0, atol=1e-7)


def test_unipc_schedule_is_diffusers():
    for steps, shift in [(1, 1.0), (4, SHIFT), (50, 5.0)]:
        scheduler = UniPCMultistepScheduler(**dict(WAN_UNIPC, flow_shift=shift))
        scheduler.set_timesteps(steps)
        sigmas, timesteps = unipc_flow_sigmas(steps, shift)
        np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=0, atol=1e-7)
        np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_solver_matches_diffusers(order):
    """Our UniPC against diffusers' scheduler on a nonlinear toy velocity field, 8 steps: every branch of
    the predictor and the corrector (warm-up, full order, the lower-order last step) is taken."""
    rng = np.random.default_rng(order)
    a = rng.normal(size=(6, 6)).astype(np.float32) / 3
    x0 = rng.normal(size=(2, 6)).astype(np.float32)

    def velocity(x, sigma):  # the same field in numpy and in the loop below
        return np.tanh(np.asarray(x) @ a) + np.float32(sigma) * x0

    scheduler = UniPCMultistepScheduler(**dict(WAN_UNIPC, solver_order=order))
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas.numpy()
    noise = rng.normal(size=(2, 6)).astype(np.float32)
    x = torch.from_numpy(noise)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(torch.from_numpy(velocity(x.numpy(), sigmas[i])), t, x).prev_sample
    ours = unipc_sample(lambda x, i: velocity(x, sigmas[i]), noise, sigmas, order)
    assert np.all(np.isfinite(x.numpy()))
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=0, atol=1e-5)
    # The corrector matters: without it the result moves far past the tolerance.
    uncorrected = unipc_sample(lambda x, i: velocity(x, sigmas[i]), noise, sigmas, order,
                               disable_corrector=tuple(range(8)))
    assert np.max(np.abs(np.asarray(uncorrected) - x.numpy())) > 1e-3


def test_matches_diffusers_wan_pipeline(pipeline):
    """Same noise, same video, to 5e-5 of the [0, 1] range (1/80 of an 8-bit level). Both sides run float32
    and differ only in rounding (summation order in matmuls and convolutions), which the parity tests of the
    parts bound at ~5e-6 relative each; here it passes three DiT steps, guidance 5 (which multiplies the
    branch difference, rounding included, by 5) and the VAE decoder. Measured: 1.0e-5 here (7.7e-6 to
    1.0e-5 over runs and text lengths; 4.6e-6 without guidance), so the bound leaves a ~5x margin. Each
    misreading tried by hand moves the video by far more: features not zeroed past the caption 0.48,
    guidance 4 instead of 5 0.09, an empty negative prompt 0.2, a changed word 0.38, 4 steps instead of
    3 0.5."""
    pipe, _, ours = pipeline
    latents = _noise()
    ref = _diffusers(pipe, latents)
    out = ours(**REQUEST, latents=latents)
    assert ref.shape == out.shape == (1, 9, 32, 32, 3) and out.dtype == np.float32
    # Not saturated: most pixels lie strictly inside (0, 1), so clipping hides no difference.
    assert np.mean((ref > 0.01) & (ref < 0.99)) > 0.9
    diff = float(np.max(np.abs(out - ref)))
    print(f"max |ours - diffusers| {diff:.2e} (pixel std {ref.std():.3f})")
    assert diff < ATOL

    # Channels-last noise gives the same video; every knob moves the video far past the tolerance.
    same = ours(**REQUEST, latents=latents.transpose(0, 2, 3, 4, 1), latents_layout="ours")
    np.testing.assert_array_equal(same, out)
    for name, changed in [("guidance 4", dict(guidance_scale=4.0)), ("negative prompt", dict(negative_prompt="")),
                          ("one more step", dict(num_inference_steps=4))]:
        moved = float(np.max(np.abs(ours(**dict(REQUEST, **changed), latents=latents) - out)))
        print(f"{name}: moves the video by {moved:.2e}")
        assert moved > 100 * ATOL, name


def test_unipc_pipeline_matches_diffusers(pipeline, tmp_path):
    """The scheduler of the released checkpoints: UniPC-bh2 with flow sigmas, read from the directory. Four
    steps take the first-order start, the second-order predictor and both correctors. Measured: 3.3e-6,
    float32 rounding as in the Euler comparison, under the same tolerance. Broken by hand: float timesteps
    (999.999 where diffusers truncates to 999) move the video by 0.08, first order 0.07, no corrector 0.06."""
    pipe, path, _ = pipeline
    unipc_dir = _copy(path, str(tmp_path / "unipc"), without="scheduler")
    UniPCMultistepScheduler(**WAN_UNIPC).save_pretrained(os.path.join(unipc_dir, "scheduler"))
    ours = WanTextToVideo.from_pretrained(unipc_dir, attention="xla")
    assert ours.scheduler == Scheduler("unipc", SHIFT, order=2)
    latents, request = _noise(2), dict(num_inference_steps=4)
    pipe.scheduler = UniPCMultistepScheduler(**WAN_UNIPC)
    try:
        ref = _diffusers(pipe, latents, **request)
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    out = ours(**dict(REQUEST, **request), latents=latents)
    euler = WanTextToVideo(ours.text_encoder, ours.tokenizer, ours.transformer, ours.vae, Scheduler("euler", SHIFT))
    moved = np.max(np.abs(euler(**dict(REQUEST, **request), latents=latents) - out))
    print(f"UniPC: max |ours - diffusers| {np.max(np.abs(out - ref)):.2e}; Euler instead moves it by {moved:.2e}")
    assert np.max(np.abs(out - ref)) < ATOL
    assert moved > 100 * ATOL


def test_shift_and_guidance_off_match_too(pipeline):
    """At guidance <= 1 both run the conditional branch alone (with the default 512 text positions here),
    and another shift gives another video, ours and diffusers' alike."""
    pipe, path, ours = pipeline
    latents = _noise(1)
    no_cfg = dict(guidance_scale=1.0, num_inference_steps=2, max_sequence_length=512)
    out = ours(**dict(REQUEST, **no_cfg), latents=latents)
    assert np.max(np.abs(out - _diffusers(pipe, latents, **no_cfg))) < ATOL

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.5)
    try:
        ref = _diffusers(pipe, latents, **no_cfg)
    finally:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    shifted = WanTextToVideo(ours.text_encoder, ours.tokenizer, ours.transformer, ours.vae, Scheduler("euler", 1.5))
    got = shifted(**dict(REQUEST, **no_cfg), latents=latents)
    print(f"guidance 1: {np.max(np.abs(got - ref)):.2e} from diffusers; shift 1.5 instead of 3 moves the video by "
          f"{np.max(np.abs(got - out)):.2e}")
    assert np.max(np.abs(got - ref)) < ATOL
    assert np.max(np.abs(got - out)) > 100 * ATOL


def test_prompt_features_are_trimmed_and_zero_padded(pipeline):
    pipe, _, ours = pipeline
    prompts = ["w1 w2 &amp; w3", " w4\n\tw5 "]
    assert [clean_prompt(p) for p in prompts] == ["w1 w2 & w3", "w4 w5"]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    got = np.asarray(ours.encode_prompt(prompts, max_sequence_length=16))
    assert got.shape == (2, 16, TEXT_DIM)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-4 * float(ref.abs().max()))
    # "&" is unknown (<unk>): 4 words + </s>, then 2 words + </s>; every later row is exactly zero.
    assert [int(np.any(row != 0, axis=-1).sum()) for row in got] == [5, 3]


def _copy(src, dst, without=None):
    """A copy of the pipeline directory `src`, without its subfolder `without`."""
    shutil.copytree(src, dst, ignore=lambda d, names: [without] if d == src and without in names else [])
    return dst


def test_bad_directories_are_named(pipeline, tmp_path):
    _, path, _ = pipeline
    with pytest.raises(FileNotFoundError, match="lacks the subfolder.*transformer"):
        WanTextToVideo.from_pretrained(_copy(path, str(tmp_path / "no_dit"), without="transformer"))
    with pytest.raises(FileNotFoundError, match="model_index.json does not exist"):
        WanTextToVideo.from_pretrained(os.path.join(path, "vae"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        WanTextToVideo.from_pretrained(str(tmp_path / "nowhere"))

    no_weights = _copy(path, str(tmp_path / "no_weights"))
    os.remove(os.path.join(no_weights, "transformer", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no .safetensors weights in .*transformer"):
        WanTextToVideo.from_pretrained(no_weights)

    other = _copy(path, str(tmp_path / "dpm"), without="scheduler")
    DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0).save_pretrained(os.path.join(other, "scheduler"))
    with pytest.raises(ValueError, match="the scheduler 'DPMSolverMultistepScheduler' is not reproduced.*shift=3.0"):
        WanTextToVideo.from_pretrained(other)
    assert WanTextToVideo.from_pretrained(other, solver="euler", shift=3.0).scheduler == Scheduler("euler", 3.0)
    karras = _copy(path, str(tmp_path / "karras"), without="scheduler")
    UniPCMultistepScheduler(**WAN_UNIPC, use_karras_sigmas=True).save_pretrained(os.path.join(karras, "scheduler"))
    with pytest.raises(ValueError, match="UniPCMultistepScheduler with use_karras_sigmas=True is not reproduced"):
        WanTextToVideo.from_pretrained(karras)


def test_bad_requests_are_named(pipeline):
    _, _, ours = pipeline
    with pytest.raises(ValueError, match="num_frames=8: this VAE takes 1 \\+ 4k frames; pass 5 or 9"):
        ours("w1", height=32, width=32, num_frames=8)
    with pytest.raises(ValueError, match="height=24, width=32: both must be positive multiples of 16 x 16"):
        ours("w1", height=24, width=32, num_frames=9)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 3, 2, 2\) .* needs \(1, 4, 3, 4, 4\)"):
        ours("w1", height=32, width=32, num_frames=9, latents=np.zeros((1, 4, 3, 2, 2)))
    with pytest.raises(ValueError, match="2 prompt\\(s\\) and 3 negative"):
        ours(["w1", "w2"], ["", "", ""], height=32, width=32, num_frames=9)
