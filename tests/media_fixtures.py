"""A tiny folder of real encoded media (good and bad) for tests of the data pipeline.

``make_media_folder(root)`` writes it with PyAV and Pillow in well under a second. Every video frame
shows its own index as the grey level of the top half (``frame_index`` reads it back), and a coloured
square moves along the bottom, so tests can check which native frames a decoder returned.
"""
from __future__ import annotations

import io
import json
import pathlib
import struct
import zlib

import av
import numpy as np
from PIL import Image

# Grey level of frame i's top half: _LEVEL_BASE + _LEVEL_STEP * i (i < 20 stays below 255). Steps of 12
# survive H.264 / VP9 compression of flat areas with a wide margin (errors are 1-2 levels).
_LEVEL_BASE, _LEVEL_STEP = 10, 12
_SQUARE = 8

# (relative path, encoder, width, height, frames, fps, square colour); webm rows need libvpx in the wheel.
_VIDEOS = (
    ("videos/wide_h264.mp4", "libx264", 48, 32, 12, 8, (255, 0, 0)),
    ("videos/tall_h264.mp4", "libx264", 32, 48, 20, 16, (0, 255, 0)),
    ("videos/square_vp9.webm", "libvpx-vp9", 40, 40, 16, 16, (0, 0, 255)),
    ("videos/wide_vp8.webm", "libvpx", 48, 32, 9, 8, (255, 255, 0)),
)
_ENCODER_OPTIONS = {
    "libx264": {"crf": "10", "preset": "ultrafast"},
    "libvpx-vp9": {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "4", "b": "2M", "deadline": "realtime", "cpu-used": "8"},
}
_CODEC_NAMES = {"libx264": "h264", "libvpx-vp9": "vp9", "libvpx": "vp8"}


def frame_pixels(index: int, height: int, width: int, colour=(255, 0, 0)) -> np.ndarray:
    """Frame ``index`` of a fixture video: uint8 (height, width, 3)."""
    frame = np.full((height, width, 3), _LEVEL_BASE + _LEVEL_STEP * index, np.uint8)
    x = (index * 2) % (width - _SQUARE)
    frame[height - _SQUARE - 2:height - 2, x:x + _SQUARE] = colour
    return frame


def frame_index(frame: np.ndarray) -> int:
    """The native frame index a decoded fixture frame shows (read from the grey top half)."""
    top = frame[: frame.shape[0] // 2].astype(np.float64).mean()
    return int(round((top - _LEVEL_BASE) / _LEVEL_STEP))


def encode_video(path: pathlib.Path, encoder: str, width: int, height: int, frames: int, fps: int,
                 colour=(255, 0, 0)) -> None:
    """Writes a fixture video with PyAV (default muxing: an MP4's index, the moov atom, goes last)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps, options=_ENCODER_OPTIONS.get(encoder, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = av.VideoFrame.from_ndarray(frame_pixels(i, height, width, colour), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())


def encode_audio_only(path: pathlib.Path) -> None:
    """A valid MP4 holding a quarter second of AAC audio and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000, layout="mono")
        tone = (0.1 * np.sin(np.arange(1024) / 5.0)).astype(np.float32)[None]
        for k in range(2):
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with almost no pixel data (it cannot decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _image(height: int, width: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    pixels[..., 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return Image.fromarray(pixels)


def make_media_folder(root: pathlib.Path) -> dict:
    """Writes the fixture media under ``root``.

    Parameters
    ----------
    root : pathlib.Path
        Folder to write into (created if missing).

    Returns
    -------
    dict
        "good": relative paths of readable media; "bad": {relative path: expected BadMedia reason};
        "expected": {good relative path: dict(kind, width, height, frames, fps, codec, colour)}.
    """
    root = pathlib.Path(root)
    for sub in ("videos", "images", "bad"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    expected = {}
    for rel, encoder, width, height, frames, fps, colour in _VIDEOS:
        if encoder not in av.codecs_available:  # A wheel without libvpx still gets four good videos.
            encoder, rel = "libx264", rel.replace(".webm", ".mp4")
        encode_video(root / rel, encoder, width, height, frames, fps, colour)
        expected[rel] = dict(kind="video", width=width, height=height, frames=frames, fps=float(fps),
                             codec=_CODEC_NAMES[encoder], colour=colour)
    _image(32, 48).save(root / "images/still.png")
    _image(48, 40).save(root / "images/photo.jpg", quality=95)
    _image(32, 32).save(root / "images/really_png.mp4", format="PNG")  # content decides, not the name
    for rel, (h, w), codec in (("images/still.png", (32, 48), "png"), ("images/photo.jpg", (48, 40), "jpeg"),
                               ("images/really_png.mp4", (32, 32), "png")):
        expected[rel] = dict(kind="image", width=w, height=h, frames=1, fps=0.0, codec=codec, colour=None)

    mp4 = (root / _VIDEOS[0][0]).read_bytes()
    # The moov atom (the index) is written last, so the first 30% never opens: always "corrupt".
    (root / "bad/truncated.mp4").write_bytes(mp4[: int(len(mp4) * 0.3)])
    (root / "bad/empty.mp4").write_bytes(b"")
    encode_audio_only(root / "bad/audio_only.mp4")
    (root / "bad/junk.mp4").write_bytes(b"this is a text file, not a video\n" * 8)
    (root / "bad/huge_header.png").write_bytes(png_header(20000, 20000))
    bad = {"bad/truncated.mp4": "corrupt", "bad/empty.mp4": "empty", "bad/audio_only.mp4": "no_video_stream",
           "bad/junk.mp4": "corrupt", "bad/huge_header.png": "too_large"}
    return {"good": list(expected), "bad": bad, "expected": expected}


def write_manifest(root: pathlib.Path, entries, name: str = "manifest.jsonl") -> pathlib.Path:
    """Writes a JSONL manifest of {"path", "caption"} lines (caption None is written as null).

    Parameters
    ----------
    root : pathlib.Path
        Folder the manifest goes in (paths in it are usually relative to this folder).
    entries : iterable of (str, str or None)
        (path, caption) pairs, in order.
    name : str
        File name of the manifest.

    Returns
    -------
    pathlib.Path
        The manifest's path.
    """
    path = pathlib.Path(root) / name
    with io.open(path, "w", encoding="utf-8") as f:
        for rel, caption in entries:
            f.write(json.dumps({"path": str(rel), "caption": caption}, ensure_ascii=False) + "\n")
    return path
