"""Writing generated media: MP4 (H.264 via PyAV) and GIF for videos, PNG for single frames."""
from __future__ import annotations

import os
import re

import av
import numpy as np
from PIL import Image


def slug(text: str, max_len: int = 48) -> str:
    """A filesystem-safe name from a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "sample"


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """H.264 needs even sizes, so odd frames are padded by one edge pixel (never cropped)."""
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_media(out_dir: str, name: str, frames: np.ndarray, fps: int) -> list[str]:
    """Writes one PNG (1 frame) or one MP4 and one GIF (video); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    if frames.shape[0] == 1:
        Image.fromarray(frames[0]).save(base + ".png")
        return [base + ".png"]
    write_mp4(base + ".mp4", frames, fps)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(base + ".gif", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return [base + ".mp4", base + ".gif"]
