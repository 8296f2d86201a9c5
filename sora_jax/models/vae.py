"""3D causal convolutional VAE (Flax NNX), laid out so that it can express the Wan 2.1 VAE.

Channels-last throughout: videos are (B, T, H, W, C) in [-1, 1]. Causal convolutions pad only the past
side of time, so frame t never sees frames after t. The first frame is encoded on its own (temporal
down-sampling keeps it and strides over the rest), so an image is a 1-frame video and T = 1 + 4k frames
become 1 + k latent frames with the default 4x8x8 compression.

Two ways to run it compute the same function. The whole-sequence form (`encode`, `decode`) is simplest;
the streaming form (`encode_chunked`, `decode_chunked`) runs causally in chunks (first chunk 1 frame,
then `chunk` frames) with a per-layer frame cache -- each causal convolution keeps the last 2 frames it
saw, each temporal resampler the frame(s) it needs -- so memory is bounded whatever the video length.
A `Stream` context threads the caches through the layers; without one, layers see the whole sequence.
Module and parameter names follow diffusers' `AutoencoderKLWan` so that `sora_jax.convert` can map its
safetensors one to one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a CausalVAE; the defaults are the Wan 2.1 VAE (4x8x8 compression, 16 channels)."""
    in_channels: int = 3
    out_channels: int = 3
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def stride(self) -> tuple[int, int, int]:
        """(t, h, w) compression: 2 per temporal / spatial down-sampling stage."""
        spatial = 2 ** (len(self.dim_mult) - 1)
        return 2 ** sum(bool(d) for d in self.temporal_downsample), spatial, spatial

    @classmethod
    def from_dict(cls, d) -> "VAEConfig":
        """From a dict (or ConfigDict); lists become tuples, unknown keys are an error."""
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VAE config fields {sorted(unknown)}.")
        for key, value in d.items():
            if isinstance(value, (list, tuple)):
                d[key] = tuple(value)
        return cls(**d)


def _param(value, axes) -> nnx.Param:
    """A parameter annotated with logical axes. Eager sharding is off per parameter (not only through the
    global switch), because the global switch is thread-local and grain encodes in worker threads."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


_TORCH_DEFAULT_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Stream:
    """Per-call streaming context: caches read from `cache`, written to `new`; `first` marks chunk 0."""

    def __init__(self, cache: dict, first: bool):
        self.cache, self.new, self.first = cache, {}, first

    def frames(self, key: str, like: jax.Array, count: int) -> jax.Array:
        """The cached frames for `key`, or zeros (causal padding) before the first chunk."""
        if key in self.cache:
            return self.cache[key]
        return jnp.zeros((like.shape[0], count, *like.shape[2:]), like.dtype)


class CausalConv3d(nnx.Module):
    """3D convolution with zero padding on the past side of time only (2 * pad_t frames)."""

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, *, rngs: nnx.Rngs):
        self.kernel_size = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.kernel = _param(_TORCH_DEFAULT_INIT(rngs.params(), (*self.kernel_size, cin, cout)),
                             (None, None, None, "conv_in", "conv_out"))
        bound = 1.0 / math.sqrt(cin * math.prod(self.kernel_size))
        self.bias = _param(jax.random.uniform(rngs.params(), (cout,), minval=-bound, maxval=bound), ("conv_out",))

    def __call__(self, x: jax.Array, stream: Stream | None = None) -> jax.Array:
        pt, ph, pw = self.padding
        if stream is not None and pt > 0:
            # The past frames come from the cache (zeros before the first chunk), not from padding.
            x = jnp.concatenate([stream.frames(self.cache_key, x, 2 * pt), x], axis=1)
            stream.new[self.cache_key] = x[:, -2 * pt:]
            pt = 0
        x = jnp.pad(x, ((0, 0), (2 * pt, 0), (ph, ph), (pw, pw), (0, 0)))
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), self.stride, "VALID",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...].astype(x.dtype)


class FrameConv2d(nnx.Module):
    """A 2D convolution applied to every frame independently."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *, rngs: nnx.Rngs):
        self.stride, self.padding = stride, padding
        self.kernel = _param(_TORCH_DEFAULT_INIT(rngs.params(), (kernel, kernel, cin, cout)),
                             (None, None, "conv_in", "conv_out"))
        bound = 1.0 / math.sqrt(cin * kernel * kernel)
        self.bias = _param(jax.random.uniform(rngs.params(), (cout,), minval=-bound, maxval=bound), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]), self.kernel[...].astype(x.dtype), (self.stride, self.stride),
            [(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(x.dtype)
        return y.reshape(b, t, *y.shape[1:])


class ChannelRMSNorm(nnx.Module):
    """x / ||x||_channels * sqrt(C) * gamma (L2-normalise over channels, as Wan does)."""

    def __init__(self, dim: int):
        self.gamma = _param(jnp.ones((dim,)), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
        x = x.astype(jnp.float32) / jnp.maximum(norm, 1e-12)
        return (x * math.sqrt(x.shape[-1]) * self.gamma[...]).astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1, rngs=rngs)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1, rngs=rngs)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x, stream: Stream | None = None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), stream)
        x = self.conv2(jax.nn.silu(self.norm2(x)), stream)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = FrameConv2d(dim, 3 * dim, 1, rngs=rngs)
        self.proj = FrameConv2d(dim, dim, 1, rngs=rngs)

    def __call__(self, x, stream: Stream | None = None):
        del stream  # attention is within each frame: nothing to cache
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        return x + self.proj(out.reshape(b, t, h, w, c))


class Resample(nnx.Module):
    """Spatial x2 up/down-sampling, optionally with temporal x2 through a causal time convolution.

    Time is resampled around the first frame: down-sampling keeps frame 0 and strides 2 over the whole
    sequence; up-sampling keeps frame 0 and doubles every later frame, so 1 + k <-> 1 + 2k frames.
    """

    def __init__(self, dim: int, mode: str, *, rngs: nnx.Rngs):
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample_conv = FrameConv2d(dim, dim // 2, 3, padding=1, rngs=rngs)
            self.time_conv = (CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), rngs=rngs)
                              if mode == "upsample3d" else None)
        else:
            self.resample_conv = FrameConv2d(dim, dim, 3, stride=2, rngs=rngs)
            self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs)
                              if mode == "downsample3d" else None)

    def __call__(self, x, stream: Stream | None = None):
        if self.mode == "upsample3d":
            x = self._double_frames(x, stream)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, exact for a factor of 2
            return self.resample_conv(x)
        x = self.resample_conv(jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0))))
        if self.mode == "downsample3d":
            x = self._halve_frames(x, stream)
        return x

    def _double_frames(self, x, stream):
        """Frame 0 of the sequence passes; every later frame becomes two (causal time conv)."""
        head_len = 1 if stream is None or stream.first else 0
        head, tail = x[:, :head_len], x[:, head_len:]
        if tail.shape[1] == 0:
            if stream is not None:  # keep the time conv's cache at its causal zeros
                stream.new[self.time_conv.cache_key] = stream.frames(self.time_conv.cache_key, x, 2)
            return head
        b, t, h, w, c = tail.shape
        tail = jnp.moveaxis(self.time_conv(tail, stream).reshape(b, t, h, w, 2, c), 4, 2)
        return jnp.concatenate([head, tail.reshape(b, 2 * t, h, w, c)], axis=1)

    def _halve_frames(self, x, stream):
        """Frame 0 of the sequence passes; then stride 2 over the whole sequence (3-frame windows)."""
        if stream is None:
            if x.shape[1] < 3:
                return x[:, :1]
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        key = self.time_conv.cache_key
        if stream.first:
            if x.shape[1] != 1:
                raise ValueError("the first chunk of a stream must hold exactly one frame.")
            stream.new[key] = x
            return x
        stream.new[key] = x[:, -1:]
        return self.time_conv(jnp.concatenate([stream.cache[key], x], axis=1))


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs), ResidualBlock(dim, dim, rngs=rngs)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs)])

    def __call__(self, x, stream: Stream | None = None):
        x = self.resnets[0](x, stream)
        return self.resnets[1](self.attentions[0](x), stream)


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, rngs=rngs)
        blocks, scale = [], 1.0
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(din, dout, rngs=rngs))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(dout, rngs=rngs))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(dout, mode, rngs=rngs))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, rngs=rngs)

    def __call__(self, x, stream: Stream | None = None):
        x = self.conv_in(x, stream)
        for block in self.down_blocks:
            x = block(x, stream)
        x = self.mid_block(x, stream)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


class UpBlock(nnx.Module):
    def __init__(self, din: int, dout: int, num_res_blocks: int, mode: str | None, *, rngs: nnx.Rngs):
        resnets = []
        for _ in range(num_res_blocks + 1):
            resnets.append(ResidualBlock(din, dout, rngs=rngs))
            din = dout
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(dout, mode, rngs=rngs)]) if mode else None

    def __call__(self, x, stream: Stream | None = None):
        for block in self.resnets:
            x = block(x, stream)
        return x if self.upsamplers is None else self.upsamplers[0](x, stream)


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        mult = list(cfg.dim_mult)
        dims = [cfg.base_dim * m for m in [mult[-1], *mult[::-1]]]
        temporal_up = list(cfg.temporal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, rngs=rngs)
        self.mid_block = MidBlock(dims[0], rngs=rngs)
        blocks = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                din //= 2  # the previous up-sampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(din, dout, cfg.num_res_blocks, mode, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, z, stream: Stream | None = None):
        x = self.mid_block(self.conv_in(z, stream), stream)
        for block in self.up_blocks:
            x = block(x, stream)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), stream)


class CausalVAE(nnx.Module):
    """The autoencoder: encode(video) -> latent mean, decode(latent) -> video, channels-last."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(f"temporal_downsample has {len(cfg.temporal_downsample)} entries; it needs one per "
                             f"down-sampling stage, len(dim_mult) - 1 = {len(cfg.dim_mult) - 1}.")
        self.cfg = cfg
        self.channels = cfg.z_dim
        self.stride = cfg.stride
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, rngs=rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        for path, module in nnx.iter_modules(self):
            if isinstance(module, CausalConv3d):  # stable names for the streaming caches
                module.cache_key = "/".join(str(p) for p in path)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        st, sh, sw = self.stride
        return 1 + (frames - 1) // st, height // sh, width // sw

    def check_video(self, video) -> None:
        """Raises ValueError naming the problem for a video this VAE cannot encode."""
        if video.ndim != 5:
            raise ValueError(f"video must be (B, T, H, W, C); got shape {tuple(video.shape)}.")
        _, t, h, w, c = video.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"video has {c} channels; this VAE takes {self.cfg.in_channels} (channels-last).")
        if t == 0:
            raise ValueError("video has 0 frames; pass at least 1 (an image is a 1-frame video).")
        st, sh, sw = self.stride
        if (t - 1) % st:
            k = (t - 1) // st
            raise ValueError(f"video has {t} frames; this VAE takes 1 + {st}k frames. Trim to {1 + st * k} or pad "
                             f"to {1 + st * (k + 1)} frames (pad_frames repeats the last frame).")
        if h % sh or w % sw:
            raise ValueError(f"video frames are {h}x{w}; height and width must be multiples of {sh} and {sw}.")

    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior mean and log-variance (clipped to [-30, 20]) of the diagonal Gaussian."""
        self.check_video(video)
        h = self.quant_conv(self.encoder(video))
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, video: jax.Array) -> jax.Array:
        """Latent mean (B, 1 + (T-1)/st, H/sh, W/sw, z_dim)."""
        return self.encode_moments(video)[0]

    def decode(self, latent: jax.Array, clip: bool = True) -> jax.Array:
        """Video in [-1, 1] from latents (B, T', H', W', z_dim); clip=False (training) leaves the range open."""
        if latent.ndim != 5 or latent.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"latent must be (B, T, H, W, {self.cfg.z_dim}); got shape {tuple(latent.shape)}.")
        video = self.decoder(self.post_quant_conv(latent))
        return jnp.clip(video, -1.0, 1.0) if clip else video

    def encode_chunked(self, video: jax.Array | Iterable[jax.Array], chunk: int | None = None) -> jax.Array:
        """Latent mean, computed causally in chunks with frame caches; equals `encode(video)`.

        Args:
          video: (B, T, H, W, C), or an iterable of such pieces (first 1 frame, then multiples of the
            temporal stride) so that a long video never has to be in memory at once.
          chunk: frames per chunk after the first (a multiple of the temporal stride; default 4 strides,
            which measured fastest on CPU among 1-8 strides while memory stays that of one chunk).
        """
        st = self.stride[0]
        chunk = chunk or 4 * st
        if chunk % st:
            raise ValueError(f"chunk={chunk} must be a multiple of the temporal stride {st}.")
        if not isinstance(video, (jax.Array, jnp.ndarray)) and not hasattr(video, "shape"):
            pieces = iter(video)
        else:
            self.check_video(video)
            pieces = (video[:, s:s + (1 if s == 0 else chunk)] for s in [0, *range(1, video.shape[1], chunk)])
        graphdef, params = nnx.split(self)
        cache, outs = {}, []
        for i, piece in enumerate(pieces):
            if i > 0 and piece.shape[1] % st:
                raise ValueError(f"chunk {i} has {piece.shape[1]} frames; after the first frame, chunks must hold a "
                                 f"multiple of {st} frames.")
            latent, cache = _stream_step(graphdef, params, jnp.asarray(piece), cache, i == 0, "encode")
            outs.append(latent)
        return jnp.concatenate(outs, axis=1)

    def decode_chunked(self, latent: jax.Array, chunk: int = 4) -> Iterator[jax.Array]:
        """Yields the decoded video piece by piece (`chunk` latent frames at a time, causally cached).

        Concatenated along time, the pieces equal `decode(latent)`; memory stays that of one chunk.
        """
        if latent.ndim != 5 or latent.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"latent must be (B, T, H, W, {self.cfg.z_dim}); got shape {tuple(latent.shape)}.")
        graphdef, params = nnx.split(self)
        cache = {}
        for i, start in enumerate(range(0, latent.shape[1], chunk)):
            video, cache = _stream_step(graphdef, params, latent[:, start:start + chunk], cache, i == 0, "decode")
            yield video

    def normalize(self, latent: jax.Array) -> jax.Array:
        """Per-channel (z - mean) / std, as the Wan pipeline feeds its DiT."""
        if self.cfg.latents_mean is None:
            return latent
        return (latent - jnp.asarray(self.cfg.latents_mean)) / jnp.asarray(self.cfg.latents_std)

    def denormalize(self, latent: jax.Array) -> jax.Array:
        if self.cfg.latents_mean is None:
            return latent
        return latent * jnp.asarray(self.cfg.latents_std) + jnp.asarray(self.cfg.latents_mean)


@functools.partial(jax.jit, static_argnames=("graphdef", "first", "which"))
def _stream_step(graphdef, params, x, cache, first: bool, which: str):
    """One chunk through the encoder or decoder; returns (output, updated caches). Compiled per chunk shape."""
    vae = nnx.merge(graphdef, params)
    stream = Stream(cache, first)
    if which == "encode":
        y = jnp.split(vae.quant_conv(vae.encoder(x, stream)), 2, axis=-1)[0]
    else:
        y = jnp.clip(vae.decoder(vae.post_quant_conv(x), stream), -1.0, 1.0)
    return y, stream.new


def pad_frames(video, multiple: int = 4):
    """Pads (B, T, ...) to the next 1 + multiple * k frames by repeating the last frame (the documented rule)."""
    t = video.shape[1]
    target = 1 + multiple * math.ceil((t - 1) / multiple)
    if target == t:
        return video
    return jnp.concatenate([video, jnp.repeat(video[:, -1:], target - t, axis=1)], axis=1)
