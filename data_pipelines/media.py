"""Reading real media files: probe, decode a clip, and choose a resolution for a token budget.

Videos are read with PyAV (FFmpeg), images with Pillow. The kind of a file is decided by its content,
never by its extension: a PNG named ``clip.mp4`` is read as an image and junk named ``clip.mp4`` is
refused. Every problem with a file surfaces as one exception type, :class:`BadMedia`, whose ``reason``
is one of :data:`SKIP_REASONS`, so a data pipeline can skip and count bad files instead of stopping.

Clip sampling rule (``decode``)
-------------------------------
With ``fps > 0`` the clip takes every ``s``-th native frame, where the integer stride ``s >= 1`` is the
one whose rate ``native_fps / s`` is closest to the requested ``fps`` on a log scale (ties: the smaller
stride). Frames are never duplicated: a source slower than the request keeps all its frames and the
returned ``fps`` says the true (lower) rate. The returned ``fps`` is always the effective rate of the
clip, ``native_fps / s``, which may differ from the request when the ratio is not an integer
(30 fps asked for 8 gives stride 4, i.e. 7.5 fps).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings

import av
import numpy as np
from PIL import Image

SKIP_REASONS = ("corrupt", "empty", "no_video_stream", "too_large", "missing_caption", "bad_caption")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# Pillow formats read as still images. GIF is left to FFmpeg: it is listed as a video format.
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# EXIF orientation tag -> the transpose that shows the image upright (phone photos are stored sideways).
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadMedia(ValueError):
    """A media file that cannot be used; ``reason`` says why (one of ``SKIP_REASONS``).

    Parameters
    ----------
    reason : str
        One of ``SKIP_REASONS``; used to count skips per reason.
    message : str
        A sentence naming the file, the problem and what to do about it.
    """

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"BadMedia reason {reason!r} is not one of {SKIP_REASONS}.")
        super().__init__(message)
        self.reason, self.message = reason, message

    def __reduce__(self):
        # Grain worker processes pickle exceptions; the default would call BadMedia(message) and fail.
        return (BadMedia, (self.reason, self.message))


@dataclasses.dataclass(frozen=True)
class Limits:
    """Largest media accepted; anything bigger is ``BadMedia("too_large")``, decided from the header.

    Parameters
    ----------
    max_pixels : int
        Largest width * height of one frame.
    max_frames : int
        Largest number of frames in the file (not in the sampled clip).
    """

    max_pixels: int = 4096 * 4096
    max_frames: int = 100_000

    def __post_init__(self):
        if self.max_pixels < 1 or self.max_frames < 1:
            raise ValueError(f"Limits must be positive, got {self}.")


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What the header of a media file says.

    Attributes
    ----------
    kind : str
        "video" or "image".
    width, height : int
        Frame size in pixels (images: after their EXIF orientation is applied).
    frames : int
        Frame count from the container, else estimated as round(duration * fps); 1 for images; 0 when
        the container states neither.
    fps : float
        Native frame rate; 0.0 for images.
    duration : float
        Seconds; 0.0 for images.
    codec : str
        FFmpeg codec name for videos ("h264", "vp9"), Pillow format for images ("png", "jpeg").
    """

    kind: str
    width: int
    height: int
    frames: int
    fps: float
    duration: float
    codec: str


def _name(src) -> str:
    return f"<{len(src)} bytes of media>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def _reader(src):
    """A path for FFmpeg/Pillow, or a file object over in-memory bytes."""
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def _byte_size(src, name: str) -> int:
    if isinstance(src, (bytes, bytearray)):
        return len(src)
    try:
        return os.path.getsize(src)
    except OSError as e:
        # A vanished or unreadable file is one bad record, not a reason to stop a long run.
        raise BadMedia("corrupt", f"{name} cannot be read ({e}); check the path and its permissions.") from e


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from the header only (``getexif`` may decode a PNG to look past its pixels)."""
    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # A broken EXIF block is common and harmless: show the pixels as stored.
        return 1
    return int(exif.get(_EXIF_ORIENTATION, 1) or 1)


def _open_image(src, name: str) -> Image.Image | None:
    """The lazily opened image (header read, pixels not decoded), or None when it is not an image."""
    try:
        with warnings.catch_warnings():
            # Our own Limits decide what is too large; Pillow's warning below its hard limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(_reader(src), formats=_IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as e:
        raise BadMedia("too_large", f"{name}: {e} Shrink the image or drop it from the data set.") from e
    except Exception as e:  # Pillow plugins raise many types on a damaged header.
        raise BadMedia("corrupt", f"{name} has an unreadable image header ({e}); re-export the file.") from e


def _image_info(img: Image.Image) -> MediaInfo:
    width, height = img.size
    if _orientation(img) in (5, 6, 7, 8):  # These orientations swap the sides.
        width, height = height, width
    return MediaInfo("image", width, height, 1, 0.0, 0.0, (img.format or "image").lower())


def _open_video(src, name: str):
    try:
        return av.open(_reader(src), mode="r")
    except Exception as e:  # FFmpeg says InvalidDataError, EOFError, OSError... depending on the damage.
        raise BadMedia("corrupt", f"{name} is neither a readable image nor a readable video ({e}); "
                                  "re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it.") from e


def _video_info(container, name: str) -> MediaInfo:
    if not container.streams.video:
        # A truncated MP4 can open with one codec-less "data" stream: that is damage, not a sound file.
        others = sorted({s.type for s in container.streams if s.type in ("audio", "subtitle")})
        if others:
            raise BadMedia("no_video_stream", f"{name} has no video stream (only {', '.join(others)}); "
                                              "remove it from the video set.")
        raise BadMedia("corrupt", f"{name} holds no readable stream; re-encode it or remove it.")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise BadMedia("corrupt", f"{name}: the video stream does not state its frame size; re-encode it.")
    fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0.0)
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = int(stream.frames) or (round(duration * fps) if fps > 0 else 0)
    if fps <= 0:
        if not (frames and duration > 0):
            raise BadMedia("corrupt", f"{name}: the video stream states no frame rate; re-encode it.")
        fps = frames / duration
    duration = duration or (frames / fps)
    return MediaInfo("video", width, height, frames, fps, duration, stream.codec_context.name)


def _check_limits(info: MediaInfo, name: str, limits: Limits) -> None:
    if info.width * info.height > limits.max_pixels:
        raise BadMedia("too_large", f"{name} is {info.width}x{info.height} = {info.width * info.height} pixels per "
                                    f"frame, over Limits.max_pixels={limits.max_pixels}; raise the limit "
                                    "(data.max_pixels) or downscale the file.")
    if info.frames > limits.max_frames:
        raise BadMedia("too_large", f"{name} has {info.frames} frames, over Limits.max_frames={limits.max_frames}; "
                                    "raise the limit (data.max_frames) or split the video.")


def probe(src: str | bytes, limits: Limits = Limits()) -> MediaInfo:
    """Reads what a media file's header says, without decoding its frames.

    Parameters
    ----------
    src : str or bytes
        A file path, or the encoded file itself.
    limits : Limits
        Largest frame size and frame count accepted.

    Returns
    -------
    MediaInfo
        Kind (by content, not extension), size, frame count, fps, duration and codec.

    Raises
    ------
    BadMedia
        "empty" (0 bytes), "no_video_stream" (e.g. audio only), "too_large" (over ``limits``, decided
        from the header) or "corrupt" (anything unreadable).
    """
    info, container = _inspect(src, _name(src), limits)
    if container is not None:
        container.close()
    return info


def _inspect(src, name: str, limits: Limits):
    """probe()'s work: (info, the video's open container or None for an image); the caller closes it, so
    decode() reads a clip from the container its header came from instead of opening the file twice."""
    if _byte_size(src, name) == 0:
        raise BadMedia("empty", f"{name} is empty (0 bytes); re-export or remove it.")
    img = _open_image(src, name)
    if img is not None:
        with img:
            info = _image_info(img)
        _check_limits(info, name, limits)
        return info, None
    container = _open_video(src, name)
    try:
        try:
            info = _video_info(container, name)
        except BadMedia:
            raise
        except Exception as e:  # Odd container metadata must not escape as a non-BadMedia error.
            raise BadMedia("corrupt", f"{name}: unreadable video metadata ({e}); re-encode it.") from e
        _check_limits(info, name, limits)
    except BaseException:
        container.close()
        raise
    return info, container


def frame_stride(native_fps: float, fps: float) -> int:
    """Native frames per sampled frame: the integer s >= 1 with native_fps / s closest to fps (log scale).

    Parameters
    ----------
    native_fps : float
        Frame rate of the source.
    fps : float
        Requested rate; 0 keeps every native frame.

    Returns
    -------
    int
        The stride; 1 whenever the source is not faster than the request (frames are never repeated).
    """
    if fps <= 0 or native_fps <= fps:
        return 1
    ratio = native_fps / fps
    low, high = max(1, math.floor(ratio)), max(1, math.ceil(ratio))
    # Ties go to the smaller stride: more frames, the rate closer to the source's.
    return low if abs(math.log(ratio / low)) <= abs(math.log(high / ratio)) else high


def _rule_count(n: int, rule: int) -> int:
    """Largest T <= n with (T - 1) % rule == 0, or 0 when n < 1."""
    return 0 if n < 1 else 1 + ((n - 1) // rule) * rule


def _plan_clip(info: MediaInfo, stride: int, max_frames: int, rule: int, start: float | None,
               rng: np.random.Generator | None) -> tuple[int, int]:
    """(first native frame index, number of frames to take) for a clip."""
    total = info.frames
    if total <= 0:
        # The container states no length: read from the requested start and keep what decodes.
        first = 0 if start is None else int(round(start * info.fps))
        return first, _rule_count(max_frames, rule)
    if start is not None:
        # A start past the end is clamped to the last frame rather than refused: the file is fine.
        first = min(int(round(start * info.fps)), total - 1)
        count = _rule_count(min(max_frames, (total - 1 - first) // stride + 1), rule)
        return first, count
    count = _rule_count(min(max_frames, (total - 1) // stride + 1), rule)
    last_start = total - 1 - (count - 1) * stride
    first = int(rng.integers(0, last_start + 1)) if rng is not None else 0
    return first, count


def _read_frames(container, info: MediaInfo, first: int, stride: int, count: int) -> tuple[list, int]:
    """Native frames first, first + stride, ... (count of them, fewer if the stream ends); also the first index."""
    stream = container.streams.video[0]
    base = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    last = first - 1
    if first > 0:
        # Half a frame early, so rounding never lands after the wanted frame; FFmpeg goes back to a keyframe.
        target = base + (first - 0.5) / info.fps
        container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True)
        last = None  # Unknown until a frame with a timestamp arrives.
    out, wanted, first_taken = [], first, first
    for frame in container.decode(stream):
        if frame.pts is not None:
            index = int(round((float(frame.pts * stream.time_base) - base) * info.fps))
        else:  # No timestamp (raw streams): count frames, which is exact when no seek happened.
            index = first if last is None else last + 1
        last = index
        if index < wanted:
            continue
        if not out:
            first_taken = index
        out.append(frame.to_ndarray(width=info.width, height=info.height, format="rgb24"))
        if len(out) == count:
            break
        wanted += stride
    return out, first_taken


def _decode_image(src, name: str, info: MediaInfo) -> np.ndarray:
    img = _open_image(src, name)
    if img is None:
        raise BadMedia("corrupt", f"{name} changed while being read; check the file.")
    try:
        with img, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            orientation = _orientation(img)
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                # Transparent pixels keep arbitrary colours underneath: show them over white instead.
                rgba = img.convert("RGBA")
                rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb.alpha_composite(rgba)
                rgb = rgb.convert("RGB")
            else:
                rgb = img.convert("RGB")
            if orientation in _ORIENTATION_TRANSPOSE:
                rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
            pixels = np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # Truncated or damaged pixel data: Pillow raises OSError, SyntaxError, zlib.error...
        raise BadMedia("corrupt", f"{name}: the image data is damaged ({e}); re-export it.") from e
    if pixels.shape[:2] != (info.height, info.width):
        raise BadMedia("corrupt", f"{name}: decoded {pixels.shape[1]}x{pixels.shape[0]} pixels but the header "
                                  f"says {info.width}x{info.height}; re-export it.")
    return pixels[None]


def decode(src: str | bytes, *, fps: float = 0.0, max_frames: int, frame_stride_rule: int = 1,
           start: float | None = None, rng: np.random.Generator | None = None,
           limits: Limits = Limits()) -> tuple[np.ndarray, dict]:
    """Decodes one clip (or an image as a 1-frame clip), reading only the frames it needs.

    Parameters
    ----------
    src : str or bytes
        A file path, or the encoded file itself.
    fps : float
        Sampling rate; 0 keeps the native frames. See the module docstring for the stride rule.
    max_frames : int
        Most frames returned.
    frame_stride_rule : int
        The returned T satisfies (T - 1) % frame_stride_rule == 0 (4 gives the causal VAE's 1 + 4k).
    start : float or None
        Start time in seconds (clamped to the last frame). None: a random valid start drawn from
        ``rng`` (every start whose clip fits), or 0.0 without ``rng``.
    rng : numpy.random.Generator or None
        Draws the start when ``start`` is None.
    limits : Limits
        Largest media accepted (checked from the header first).

    Returns
    -------
    frames : numpy.ndarray
        uint8 (T, H, W, 3) at the native resolution; T is the largest count <= max_frames and <= the
        frames available that satisfies the rule. Images give T = 1.
    meta : dict
        fps (effective rate; 0.0 for images), orig_height, orig_width, duration (s), start (s of the
        first returned frame).

    Raises
    ------
    BadMedia
        As :func:`probe`, or "corrupt" when no frame decodes. A stream shorter than its header says
        returns the frames that decode (trimmed to the rule) instead.
    """
    if max_frames < 1 or frame_stride_rule < 1:
        raise ValueError(f"decode needs max_frames >= 1 and frame_stride_rule >= 1, got {max_frames} and "
                         f"{frame_stride_rule}.")
    if start is not None and start < 0:
        raise ValueError(f"decode start must be >= 0 seconds, got {start}.")
    name = _name(src)
    info, container = _inspect(src, name, limits)
    meta = dict(orig_height=info.height, orig_width=info.width, duration=info.duration)
    if container is None:
        return _decode_image(src, name, info), dict(meta, fps=0.0, start=0.0)
    frames, error = [], "the stream ended"
    with container:
        stride = frame_stride(info.fps, fps)
        first, count = _plan_clip(info, stride, max_frames, frame_stride_rule, start, rng)
        first_taken = first
        try:
            frames, first_taken = _read_frames(container, info, first, stride, count)
        except Exception as e:
            # A damaged or truncated stream: keep what decoded before the damage (checked below).
            error = f"{type(e).__name__}: {e}"
    frames = frames[:_rule_count(len(frames), frame_stride_rule)]
    if not frames:
        raise BadMedia("corrupt", f"{name}: no frame decodes from native frame {first} on ({error}; the "
                                  f"header says {info.frames} frames); re-encode or remove it.")
    return np.stack(frames), dict(meta, fps=info.fps / stride, start=first_taken / info.fps)


def fit_size(height: int, width: int, max_pixels: int, multiple: int,
             allow_upscale: bool = False, aspect_tolerance: float = 0.05) -> tuple[int, int]:
    """The frame size to train at: sides multiples of ``multiple``, area within budget, aspect kept.

    Parameters
    ----------
    height, width : int
        Native size.
    max_pixels : int
        Largest h * w.
    multiple : int
        Both sides are multiples of this (the model's spatial stride times its patch size).
    allow_upscale : bool
        Whether a side may exceed the native side.
    aspect_tolerance : float
        How far (relative) the aspect ratio may move from the native one to use more of the budget.

    Returns
    -------
    (h, w) : tuple of int
        The largest area among the allowed sizes whose aspect ratio is within ``aspect_tolerance`` of the
        native one -- or, when the grid offers none that close, within the closest achievable error --
        ties going to the closer aspect. (The closest aspect alone would waste budget: 1920x1080 under
        256 cells of 16 px is exactly 16:9 only at 144x256, 56% of the budget.) Never smaller than
        multiple x multiple, even when the budget or the native size is.
    """
    if min(height, width, max_pixels, multiple) < 1:
        raise ValueError(f"fit_size needs positive sizes, got height={height}, width={width}, "
                         f"max_pixels={max_pixels}, multiple={multiple}.")
    cells = max_pixels // (multiple * multiple)  # budget in multiple x multiple cells
    if cells < 1:
        return multiple, multiple
    aspect = width / height
    h_cap, w_cap = (cells, cells) if allow_upscale else (max(1, height // multiple), max(1, width // multiple))
    k = np.arange(1, min(h_cap, cells) + 1, dtype=np.int64)
    j_cap = np.minimum(cells // k, w_cap)
    ideal = k * aspect
    widest = np.floor(ideal * (1.0 + aspect_tolerance))  # the largest width still within tolerance
    # Per height, the candidates: the floor and ceil of the ideal width (closest aspect) and the widest
    # width within tolerance (largest area); all clipped to the budget.
    j = np.concatenate([np.clip(v, 1, j_cap) for v in (np.floor(ideal), np.ceil(ideal), widest)]).astype(np.int64)
    k = np.concatenate([k, k, k])
    error = np.abs(np.log(j / k) - math.log(aspect))
    allowed = error <= max(error.min(), math.log1p(aspect_tolerance)) + 1e-12
    area = k * j
    # Largest area first, then the smaller aspect error.
    best = int(np.lexsort((error, -np.where(allowed, area, -1)))[0])
    return int(k[best]) * multiple, int(j[best]) * multiple


def resize(frames: np.ndarray, height: int, width: int, crop: bool = False) -> np.ndarray:
    """Resizes every frame with Pillow's antialiased bicubic filter.

    Parameters
    ----------
    frames : numpy.ndarray
        uint8 (T, H, W, 3).
    height, width : int
        Output size.
    crop : bool
        False: scale to exactly (height, width) (the aspect change is only what fit_size rounded).
        True: scale to cover (height, width) keeping the aspect, then crop the centre.

    Returns
    -------
    numpy.ndarray
        uint8 (T, height, width, 3).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"resize expects uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}.")
    if height < 1 or width < 1:
        raise ValueError(f"resize needs a positive size, got {height}x{width}.")
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    box = (0.0, 0.0, float(w), float(h))
    if crop:
        scale = max(height / h, width / w)
        bw, bh = width / scale, height / scale
        box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    out = np.empty((t, height, width, 3), np.uint8)
    for i in range(t):
        # The box resamples only the kept region: cropping and scaling in one pass, no intermediate image.
        # reducing_gap=3 first shrinks large downscales by whole factors (fast, visually the same).
        out[i] = np.asarray(Image.fromarray(frames[i]).resize(
            (width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0))
    return out
