"""Generation modes on one conditioned sampler (Sampler.generate with a Condition).

  t2v         text to video
  t2i         text to image (one frame; any size the memory check admits, 2048 x 2048 included)
  i2v         an image at frame 0 (or image_frame=K) kept, the rest generated
  v2v         a video restyled: its latents noised to `strength` and denoised under the new prompt (SDEdit)
  extend      a video continued forward (after its end) or backward (before its start) by `seconds`
  loop        a clip whose last frame leads back into its first: generated with its first frame given again
              one frame past its end, that extra frame dropped; then the frames around the seam generated
              again between their neighbours
  transition  from the end of video A to the start of video B: A's last and B's first latent frame given
  long        `seconds` of video by rolling forward extension: each window conditioned on the last frames of
              the one before; device memory is that of one window, whatever the length

Media in: PNG / JPEG / MP4 / WebM (whatever PyAV decodes), read with data_pipelines.media (header limits
first) and resized to cover the requested size keeping the aspect, then centre-cropped to it. Frames
handed over clean are the autoencoder's encoding of those pixels: with the identity autoencoder they come
back bit for bit; with a VAE, within its round-trip error. Frame arithmetic is in latent frames: a causal
VAE of temporal stride s maps pixel frames 1 + s k to latent frames 1 + k (latent frame 0 is pixel frame 0).
Known approximation: an image given at a latent frame other than 0, and extension context taken from the
middle of a clip, are encoded as a clip of their own, which a causal VAE encodes slightly differently.
"""
from __future__ import annotations

import math
import os

import numpy as np

from data_pipelines import media
from data_pipelines.sources import pixel_source
from sora_jax.config_validation import ConfigError
from sora_jax.generation import Condition, Sampler, to_latents
from sora_jax.video_io import to_uint8

MAX_SOURCE_FRAMES = 4096  # frames read from a source video (extend, transition); more are not decoded
MAX_SECONDS = {"extend": 60.0, "long": 600.0}  # the longest extension / long video a request may ask for
MODES = ("t2v", "t2i", "i2v", "v2v", "extend", "loop", "transition", "long")
GIVEN_FRAME_MODES = ("i2v", "extend", "loop", "transition", "long")  # the modes that hand the model clean frames
DIRECTIONS = ("forward", "backward")


def read_media(path: str, width: int, height: int, max_frames: int, fps: float = 0.0, rule: int = 1) -> np.ndarray:
    """uint8 [T, height, width, 3] frames of an image or video file from its start: T <= max_frames with
    (T - 1) % rule == 0 (a causal VAE's 1 + s k), sampled at `fps` (0: the native rate).

    Raises:
      ConfigError: the file is missing, unreadable or beyond the decoder's size limits (naming it).
    """
    try:
        frames, _ = media.decode(path, fps=fps, max_frames=max_frames, frame_stride_rule=rule, start=0.0)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; pass the path of an image or video file.") from None
    except (media.BadMedia, OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be used: {e}") from None
    if frames.shape[0] == 0:
        raise ConfigError(f"{path} has no frame to use.")
    return media.resize(frames, height, width, crop=True)


def pixels_before(sampler: Sampler, latent_index: int) -> int:
    """How many pixel frames latent frames [0, latent_index) decode to (causal: 1 + s (j - 1))."""
    if latent_index <= 0:
        return 0
    stride = _temporal_stride(sampler)
    return 1 + stride * (latent_index - 1)


def _temporal_stride(sampler: Sampler) -> int:
    return sampler.autoencoder.stride[0]


def latent_count(sampler: Sampler, frames: int) -> int:
    """Latent frames of a clip of `frames` pixel frames."""
    return sampler.autoencoder.latent_shape(frames, 64, 64)[0]


def _blank(sampler: Sampler, latent_frames: int, width: int, height: int) -> np.ndarray:
    _, h, w = sampler.autoencoder.latent_shape(1, height, width)
    return np.zeros((1, latent_frames, h, w, sampler.autoencoder.channels), np.float32)


def trained_window(sampler: Sampler) -> int:
    """Latent frames of the longest clip the model trains on: max(config.data.frames) of the procedural world,
    config.data.clip_frames of a decoded source."""
    data = sampler.config.data
    return latent_count(sampler, max(data.frames) if pixel_source(data) == "procedural" else data.clip_frames)


def _generate(sampler: Sampler, prompt: str, width: int, height: int, frames: int, condition, **kw) -> np.ndarray:
    return _generate_latents(sampler, prompt, width, height, frames, condition, **kw)[0]


def _generate_latents(sampler: Sampler, prompt: str, width: int, height: int, frames: int, condition,
                      **kw) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 frames [T, H, W, 3], their latents [T', H', W', C]): a later window is conditioned on the latents
    the model made, not on their decode re-encoded."""
    videos, latents = sampler.generate([prompt], width, height, frames, condition=condition, return_latents=True,
                                       **kw)
    return videos[0], latents[0]


def image_to_video(sampler: Sampler, prompt: str, image: str, width: int, height: int, frames: int,
                   image_frame: int = 0, **kw) -> np.ndarray:
    """A video whose frame `image_frame` is the image (unchanged, up to the autoencoder's round trip)."""
    if not 0 <= image_frame < frames:
        raise ConfigError(f"--image_frame={image_frame} must be in [0, --frames={frames}).")
    picture = read_media(image, width, height, max_frames=1)[:1]
    condition = sampler.image_condition(picture[None], frames, latent_count(sampler, image_frame + 1) - 1)
    return _generate(sampler, prompt, width, height, frames, condition, **kw)


def video_to_video(sampler: Sampler, prompt: str, video: str, width: int, height: int, frames: int,
                   strength: float, **kw) -> np.ndarray:
    """The video restyled: noised to `strength` (0 keeps it, 1 ignores it) and denoised under the prompt."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength={strength} must be in [0, 1] (0 keeps the video, 1 ignores it).")
    source = read_media(video, width, height, frames, kw.get("fps", 0.0), _temporal_stride(sampler))
    latents = to_latents(sampler, source)[None]
    frames = source.shape[0]
    if strength == 0.0:
        return np.asarray(source)
    condition = Condition(latents, np.zeros(latents.shape[:2], bool), strength)
    return _generate(sampler, prompt, width, height, frames, condition, **kw)


def extend(sampler: Sampler, prompt: str, video: str, width: int, height: int, seconds: float,
           direction: str = "forward", fps: float = 8.0, context: int = 0, max_seconds: float = 60.0,
           window: int = 0, **kw) -> np.ndarray:
    """The video with `seconds` more of it generated after its end (forward) or before its start (backward).

    context: latent frames of the source handed over (0: as many as are generated, at most the source's).
    window: the most latent frames one generation holds (0: trained_window, the longest clip training sees). An
      extension that does not fit with its context rolls, as `long` does: windows of `window` latent frames,
      each conditioned on `context` (0: half a window) frames of the one before, so the model is never asked
      for a clip longer than it trains on (beyond it, extension does worse than freezing the last frame:
      BUILD_NOTES, "extension windows"), and memory does not grow with the length.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction={direction!r}; choose one of {DIRECTIONS}.")
    if not 0 < seconds <= max_seconds:
        raise ConfigError(f"--seconds={seconds} must be in (0, {max_seconds}] (modes.MAX_SECONDS).")
    source = read_media(video, width, height, MAX_SOURCE_FRAMES, fps, _temporal_stride(sampler))
    src_latents = to_latents(sampler, source)
    new = max(1, math.ceil(seconds * fps / _temporal_stride(sampler)))
    window = window or trained_window(sampler)
    m = min(src_latents.shape[0], context or max(1, new))
    if m + new > window:  # roll
        m = min(src_latents.shape[0], context or max(1, window // 2))
        if m >= window:
            raise ConfigError(f"the context ({m} latent frames) must be shorter than the window ({window}).")
    seed, video_px, latents = kw.pop("seed", 0), source, src_latents
    while new > 0:
        step = min(new, window - m)  # all of it when it fits with its context
        size, px, latents = _extend_window(sampler, prompt, latents, m, step, direction, width, height, fps=fps,
                                           seed=seed, **kw)  # the next window's context comes from this one
        if direction == "forward":
            video_px = np.concatenate([video_px, px[pixels_before(sampler, m):]])
        else:
            video_px = np.concatenate([px[:pixels_before(sampler, size - m)], video_px])
        new, seed = new - step, seed + 1
    return video_px


def _extend_window(sampler, prompt, src_latents, m, new, direction, width, height, **kw):
    """(window latent frames, its decoded pixels, its latents): m given frames of the source and `new` generated
    ones."""
    window = m + new
    latents, given = _blank(sampler, window, width, height), np.zeros((1, window), bool)
    if direction == "forward":
        latents[0, :m], given[0, :m] = src_latents[-m:], True
    else:
        latents[0, window - m:], given[0, window - m:] = src_latents[:m], True
    frames = pixels_before(sampler, window)
    return (window,) + _generate_latents(sampler, prompt, width, height, frames, Condition(latents, given), **kw)


def loop(sampler: Sampler, prompt: str, width: int, height: int, frames: int, seam_frames: int = 4,
         **kw) -> np.ndarray:
    """A clip that plays seamlessly end to end.

    Two passes. First the clip is generated with its first frame given again one frame past its end. That
    alone leaves a jump at the seam (the last frame -> the first: 1.64x the typical frame step on the demo
    model), since the model interpolates towards a frame it has already passed. Then the `seam_frames` latent
    frames around the seam are generated again as a transition between their neighbours on either side
    (the first_last task training mixes), so every step across the seam is one the model made between two
    frames it was shown (0.69x; BUILD_NOTES, "loop seam"). seam_frames=0 skips the second pass.

    With a causal autoencoder (temporal stride > 1) latent frame 0 stands for one pixel frame and the others
    for `stride` each, so only frames at the end are regenerated there (frame 0 is kept); with stride 1 the
    seam is centred (half at the end, half at the start).
    """
    start = _generate_latents(sampler, prompt, width, height, 1, None, **kw)[1][0]
    n = latent_count(sampler, frames)
    latents, given = _blank(sampler, n + 1, width, height), np.zeros((1, n + 1), bool)
    latents[0, 0] = latents[0, -1] = start
    given[0, 0] = given[0, -1] = True
    clip, sampled = _generate_latents(sampler, prompt, width, height, pixels_before(sampler, n + 1),
                                      Condition(latents, given), **kw)
    k = min(seam_frames, n - 2)
    if k <= 0:
        return clip[:pixels_before(sampler, n)]
    closed = close_seam(sampler, prompt, sampled[:n], k, width, height, **kw)
    return to_uint8(np.asarray(sampler.autoencoder.decode(closed[None]))[0])


def close_seam(sampler: Sampler, prompt: str, latents: np.ndarray, k: int, width: int, height: int,
               keep_first: bool | None = None, **kw) -> np.ndarray:
    """A loop's latents [n, ...] with the k frames around its seam (frame n - 1 -> frame 0) generated again,
    given the frame before them and the frame after them (k <= n - 2, so those two are different frames).

    keep_first: regenerate the last k frames only (None: when the autoencoder is causal, stride > 1); else
    k // 2 at the end and the rest at the start.
    """
    n = latents.shape[0]
    if keep_first is None:
        keep_first = _temporal_stride(sampler) > 1
    end = k if keep_first else k // 2  # regenerated at the end; k - end at the start
    window = np.concatenate([latents[n - end - 1:n - end], latents[n - end:], latents[:k - end + 1]])[None]
    given = np.zeros((1, k + 2), bool)
    given[0, 0] = given[0, -1] = True
    kw = dict(kw, seed=kw.get("seed", 0) + 1)  # fresh noise for the second pass
    _, new = _generate_latents(sampler, prompt, width, height, pixels_before(sampler, k + 2),
                               Condition(window, given), **kw)
    out = latents.copy()
    out[n - end:] = new[1:1 + end]
    out[:k - end] = new[1 + end:1 + k]
    return out


def transition(sampler: Sampler, prompt: str, video: str, video_end: str, width: int, height: int, frames: int,
               fps: float = 8.0, **kw) -> np.ndarray:
    """Video A, then `frames` generated from A's last frame to B's first, then video B."""
    rule = _temporal_stride(sampler)
    a = read_media(video, width, height, MAX_SOURCE_FRAMES, fps, rule)
    b = read_media(video_end, width, height, MAX_SOURCE_FRAMES, fps, rule)
    total = latent_count(sampler, frames) + 2
    latents, given = _blank(sampler, total, width, height), np.zeros((1, total), bool)
    latents[0, 0], latents[0, -1] = to_latents(sampler, a[-1:])[0], to_latents(sampler, b[:1])[0]
    given[0, 0] = given[0, -1] = True
    clip = _generate(sampler, prompt, width, height, pixels_before(sampler, total), Condition(latents, given),
                     fps=fps, **kw)
    return np.concatenate([a, clip[1:pixels_before(sampler, total - 1)], b])


def long_video(sampler: Sampler, prompt: str, width: int, height: int, seconds: float, fps: float = 8.0,
               window: int = 0, context: int = 0, max_seconds: float = 600.0, on_window=None, **kw) -> np.ndarray:
    """`seconds` of video by rolling forward extension over windows of `window` latent frames (0:
    config.sample.frames' worth) each conditioned on the last `context` (0: half the window) of the one before."""
    if not 0 < seconds <= max_seconds:
        raise ConfigError(f"--seconds={seconds} must be in (0, {max_seconds}] (modes.MAX_SECONDS).")
    window = window or latent_count(sampler, sampler.config.sample.frames)
    context = context or max(1, window // 2)
    if not 0 < context < window:
        raise ConfigError(f"the context ({context} latent frames) must be shorter than the window ({window}).")
    wanted = int(round(seconds * fps))
    seed = kw.pop("seed", 0)
    video, latents = _generate_latents(sampler, prompt, width, height, pixels_before(sampler, window), None,
                                       seed=seed, fps=fps, **kw)
    while video.shape[0] < wanted:
        seed += 1
        # Only the newest window's latents are kept: memory does not grow on the device.
        _, px, latents = _extend_window(sampler, prompt, latents, context, window - context, "forward", width,
                                        height, seed=seed, fps=fps, **kw)
        video = np.concatenate([video, px[pixels_before(sampler, context):]])
        if on_window is not None:
            on_window(video.shape[0], wanted)
    return video[:wanted]


# mode -> the request fields it needs (checked before anything is restored or compiled).
_NEEDS = {"i2v": ("image",), "v2v": ("video",), "extend": ("video", "seconds"), "transition": ("video", "video_end"),
          "long": ("seconds",)}


def run_mode(sampler: Sampler | None, prompt: str, request: dict, check_only: bool = False) -> np.ndarray | None:
    """Runs request["mode"] for one prompt (the CLI's dispatch); returns uint8 frames [T, H, W, 3].

    request: mode, width, height, frames, fps, steps, guidance, seed and the mode's own fields (image,
      image_frame, video, video_end, strength, direction, seconds).
    check_only: only validate the request (media present and readable headers, strength, lengths).
    """
    mode = request["mode"]
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r}; choose one of {MODES}.")
    missing = [f"--{name}" for name in _NEEDS.get(mode, ()) if request.get(name) in (None, "")]
    if missing:
        raise ConfigError(f"--mode={mode} needs {' and '.join(missing)}.")
    if mode == "v2v" and not 0.0 <= request["strength"] <= 1.0:
        raise ConfigError(f"--strength={request['strength']} must be in [0, 1] (0 keeps the video, 1 ignores it).")
    if mode in ("extend", "long") and not 0 < request["seconds"] <= MAX_SECONDS[mode]:
        raise ConfigError(f"--seconds={request['seconds']} must be in (0, {MAX_SECONDS[mode]}] for --mode={mode}.")
    for name in ("image", "video", "video_end"):
        if request.get(name) and name in _NEEDS.get(mode, ()):
            if not os.path.isfile(request[name]):
                raise ConfigError(f"--{name}={request[name]} does not exist; pass an image or video file.")
            try:
                media.probe(request[name])
            except (media.BadMedia, OSError, ValueError) as e:
                raise ConfigError(f"--{name}={request[name]} cannot be used: {e}") from None
    if check_only:
        return None
    r = request
    common = dict(steps=r["steps"], guidance=r["guidance"], seed=r["seed"], progress=True, solver=r.get("solver", ""),
                  image_guidance=r.get("image_guidance", 1.0))
    size = (r["width"], r["height"])
    if mode in ("t2v", "t2i"):
        return sampler.generate([prompt], *size, 1 if mode == "t2i" else r["frames"], fps=r["fps"], **common)[0]
    if mode == "i2v":
        return image_to_video(sampler, prompt, r["image"], *size, r["frames"], r["image_frame"], fps=r["fps"],
                              **common)
    if mode == "v2v":
        return video_to_video(sampler, prompt, r["video"], *size, r["frames"], r["strength"], fps=r["fps"], **common)
    if mode == "extend":
        return extend(sampler, prompt, r["video"], *size, r["seconds"], r["direction"], r["fps"],
                      max_seconds=MAX_SECONDS["extend"], **common)
    if mode == "loop":
        return loop(sampler, prompt, *size, r["frames"], fps=r["fps"], **common)
    if mode == "transition":
        return transition(sampler, prompt, r["video"], r["video_end"], *size, r["frames"], r["fps"], **common)
    return long_video(sampler, prompt, *size, r["seconds"], r["fps"], max_seconds=MAX_SECONDS["long"], **common)
