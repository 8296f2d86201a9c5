"""data_pipelines.media on real encoded files: probe, clip sampling, bad files, fit_size, resize."""
import math
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_pipelines import media
from data_pipelines.media import BadMedia, Limits, decode, fit_size, probe, resize
from tests.media_fixtures import frame_index, make_media_folder, png_header, write_manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return root, make_media_folder(root)


def _path(folder, rel):
    return str(folder[0] / rel)


def _indices(frames):
    return [frame_index(f) for f in frames]


# ---- probe ----------------------------------------------------------------------------------------------------

def test_probe_reads_every_good_file_by_content(folder):
    root, media_set = folder
    assert len([r for r in media_set["good"] if media_set["expected"][r]["kind"] == "video"]) >= 4
    for rel in media_set["good"]:
        want = media_set["expected"][rel]
        info = probe(str(root / rel))
        got = dict(kind=info.kind, width=info.width, height=info.height, frames=info.frames, fps=info.fps,
                   codec=info.codec)
        assert got == {k: want[k] for k in got}, rel
        if info.kind == "video":
            assert info.duration == pytest.approx(want["frames"] / want["fps"], abs=0.01)
        else:
            assert info.duration == 0.0


def test_probe_of_bytes_matches_probe_of_path(folder):
    for rel in ("videos/tall_h264.mp4", "images/photo.jpg", "images/really_png.mp4"):
        path = _path(folder, rel)
        with open(path, "rb") as f:
            assert probe(f.read()) == probe(path)


def test_png_named_mp4_is_an_image(folder):
    frames, meta = decode(_path(folder, "images/really_png.mp4"), max_frames=9)
    assert frames.shape == (1, 32, 32, 3) and meta["fps"] == 0.0


def test_bad_files_raise_their_reason_from_probe_and_decode(folder):
    root, media_set = folder
    assert set(media_set["bad"].values()) == {"corrupt", "empty", "no_video_stream", "too_large"}
    for rel, reason in media_set["bad"].items():
        for call in (lambda p: probe(p), lambda p: decode(p, max_frames=9)):
            with pytest.raises(BadMedia) as err:
                call(str(root / rel))
            assert err.value.reason == reason, (rel, str(err.value))
            assert rel in str(err.value)  # the message names the file
        with pytest.raises(BadMedia) as err:
            probe((root / rel).read_bytes())
        assert err.value.reason == reason, rel


def test_mp4_cut_anywhere_is_corrupt(folder):
    # The index (moov atom) is written last, so no cut MP4 opens as a video; a late cut can leave a
    # codec-less "data" stream, which is damage, not "no_video_stream".
    data = (folder[0] / "videos/tall_h264.mp4").read_bytes()
    for fraction in (0.05, 0.3, 0.5, 0.7, 0.9, 0.97):
        with pytest.raises(BadMedia) as err:
            decode(data[: int(len(data) * fraction)], max_frames=9)
        assert err.value.reason == "corrupt", fraction


def test_missing_file_is_bad_media_not_oserror(tmp_path):
    with pytest.raises(BadMedia) as err:
        probe(str(tmp_path / "gone.mp4"))
    assert err.value.reason == "corrupt" and "gone.mp4" in str(err.value)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Any attempt to decode image pixels fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_huge_image_header_is_refused_without_decoding(folder, no_pixel_decoding):
    # 20000 x 20000 is past Pillow's own hard limit; 5000 x 5000 is only past ours (4096 * 4096).
    for data in ((folder[0] / "bad/huge_header.png").read_bytes(), png_header(5000, 5000)):
        for call in (lambda: probe(data), lambda: decode(data, max_frames=1)):
            with pytest.raises(BadMedia) as err:
                call()
            assert err.value.reason == "too_large"
    # Probing never decodes pixels, even when the size is accepted.
    info = probe(png_header(5000, 5000), Limits(max_pixels=5000 * 5000))
    assert (info.kind, info.width, info.height) == ("image", 5000, 5000)
    assert probe(_path(folder, "images/still.png")).width == 48


def test_video_limits_come_from_the_header(folder):
    path = _path(folder, "videos/tall_h264.mp4")  # 32 x 48, 20 frames
    for limits in (Limits(max_frames=19), Limits(max_pixels=32 * 48 - 1)):
        with pytest.raises(BadMedia) as err:
            decode(path, max_frames=4, limits=limits)
        assert err.value.reason == "too_large"
    assert probe(path, Limits(max_frames=20, max_pixels=32 * 48)).frames == 20


def test_bad_media_reason_and_pickling():
    err = BadMedia("empty", "x.mp4 is empty")
    assert isinstance(err, ValueError) and str(err) == "x.mp4 is empty"
    back = pickle.loads(pickle.dumps(err))  # grain workers send exceptions between processes
    assert (back.reason, str(back)) == ("empty", "x.mp4 is empty")
    with pytest.raises(ValueError, match="not one of"):
        BadMedia("weird", "message")


# ---- decode ---------------------------------------------------------------------------------------------------

def test_fps_resampling_takes_every_second_frame(folder):
    frames, meta = decode(_path(folder, "videos/tall_h264.mp4"), fps=8.0, max_frames=100)  # 16 fps, 20 frames
    assert frames.shape == (10, 48, 32, 3) and frames.dtype == np.uint8
    assert _indices(frames) == list(range(0, 20, 2))
    assert meta == dict(fps=8.0, orig_height=48, orig_width=32, duration=pytest.approx(1.25), start=0.0)


def test_slower_source_is_never_duplicated(folder):
    frames, meta = decode(_path(folder, "videos/wide_h264.mp4"), fps=16.0, max_frames=100)  # native 8 fps
    assert _indices(frames) == list(range(12)) and meta["fps"] == 8.0
    frames, meta = decode(_path(folder, "videos/square_vp9.webm"), fps=0.0, max_frames=100)
    assert _indices(frames) == list(range(16)) and meta["fps"] == 16.0


def test_frame_stride_rule():
    assert [media.frame_stride(16, r) for r in (0, 8, 16, 20, 5.4, 6)] == [1, 2, 1, 1, 3, 3]
    assert media.frame_stride(30, 8) == 4 and media.frame_stride(60, 24) == 3  # 7.5 and 20 fps
    assert media.frame_stride(24, 16) == 2  # 12 fps is closer to 16 than 24 is, on a log scale


def test_one_plus_four_k_rule_and_max_frames(folder):
    path = _path(folder, "videos/tall_h264.mp4")  # 20 frames at 16 fps
    for kwargs, count in ((dict(max_frames=100), 17), (dict(max_frames=16), 13), (dict(max_frames=8), 5),
                          (dict(max_frames=100, fps=8.0), 9), (dict(max_frames=4), 1)):
        frames, _ = decode(path, frame_stride_rule=4, **kwargs)
        assert len(frames) == count, kwargs
        stride = 2 if kwargs.get("fps") else 1
        assert _indices(frames) == list(range(0, count * stride, stride))
    frames, _ = decode(path, max_frames=3)
    assert _indices(frames) == [0, 1, 2]


def test_random_start_is_reproducible_and_in_range(folder):
    path = _path(folder, "videos/square_vp9.webm")  # 16 frames at 16 fps; fps=8 and 5 frames span 9
    starts = set()
    for seed in range(8):
        frames, meta = decode(path, fps=8.0, max_frames=5, rng=np.random.default_rng(seed))
        again, meta_again = decode(path, fps=8.0, max_frames=5, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(frames, again)
        assert meta == meta_again
        first = _indices(frames)[0]
        assert _indices(frames) == list(range(first, first + 10, 2))
        assert 0 <= first <= 15 - 8 and meta["start"] == pytest.approx(first / 16)
        starts.add(first)
    assert len(starts) > 2
    frames, meta = decode(path, fps=8.0, max_frames=5)
    assert _indices(frames)[0] == 0 and meta["start"] == 0.0


def test_explicit_start_seeks(folder):
    for rel in ("videos/tall_h264.mp4", "videos/square_vp9.webm"):
        frames, meta = decode(_path(folder, rel), fps=8.0, max_frames=3, start=0.5)
        assert _indices(frames) == [8, 10, 12] and meta["start"] == 0.5, rel
    frames, _ = decode(_path(folder, "videos/tall_h264.mp4"), max_frames=5, start=100.0)
    assert _indices(frames) == [19]  # past the end: clamped to the last frame


def test_images_decode_to_one_frame(folder):
    for rel in ("images/still.png", "images/photo.jpg"):
        want = folder[1]["expected"][rel]
        frames, meta = decode(_path(folder, rel), fps=8.0, max_frames=17, frame_stride_rule=4)
        assert frames.shape == (1, want["height"], want["width"], 3) and frames.dtype == np.uint8
        assert meta == dict(fps=0.0, orig_height=want["height"], orig_width=want["width"], duration=0.0, start=0.0)
    png = np.asarray(Image.open(_path(folder, "images/still.png")).convert("RGB"))
    np.testing.assert_array_equal(decode(_path(folder, "images/still.png"), max_frames=1)[0][0], png)


def test_truncated_stream_returns_what_decodes(folder):
    # WebM states its duration up front, so a cut file probes as whole but holds fewer frames.
    data = (folder[0] / "videos/square_vp9.webm").read_bytes()
    cut = data[: int(len(data) * 0.7)]
    assert probe(cut).frames == 16
    frames, _ = decode(cut, max_frames=100, frame_stride_rule=4)
    assert 1 <= len(frames) < 16 and (len(frames) - 1) % 4 == 0
    assert _indices(frames) == list(range(len(frames)))
    with pytest.raises(BadMedia) as err:  # starting past the surviving data: nothing decodes
        decode(cut, max_frames=4, start=0.9)
    assert err.value.reason == "corrupt"


def test_damaged_files_only_ever_raise_bad_media(folder):
    rng = np.random.default_rng(0)
    outcomes = set()
    for rel in ("videos/tall_h264.mp4", "videos/wide_vp8.webm", "images/still.png", "images/photo.jpg"):
        data = np.frombuffer((folder[0] / rel).read_bytes(), np.uint8)
        for trial in range(6):
            damaged = data.copy()
            if trial % 2:
                damaged = damaged[: int(rng.integers(1, len(data)))]
            else:
                spots = rng.integers(0, len(data), 8)
                damaged[spots] = rng.integers(0, 256, 8)
            try:
                frames, _ = decode(damaged.tobytes(), max_frames=8, frame_stride_rule=4)
                assert len(frames) >= 1 and (len(frames) - 1) % 4 == 0
                outcomes.add("decoded")
            except BadMedia as e:
                outcomes.add(e.reason)
    assert outcomes <= {"decoded", "corrupt", "empty", "no_video_stream", "too_large"}


# ---- fit_size -------------------------------------------------------------------------------------------------

def _fit_by_brute_force(height, width, max_pixels, multiple, allow_upscale, tolerance=0.05):
    sizes = []
    cells = max_pixels // (multiple * multiple)
    for k in range(1, cells + 1):
        for j in range(1, cells // k + 1):
            h, w = k * multiple, j * multiple
            if h * w > max_pixels or (not allow_upscale and (h > height or w > width)):
                continue
            sizes.append((round(abs(math.log((w / h) / (width / height))), 12), h, w))
    limit = max(min(e for e, _, _ in sizes), round(math.log1p(tolerance), 12))
    return min(((-h * w, e), (h, w)) for e, h, w in sizes if e <= limit + 1e-12)[1]


@pytest.mark.parametrize("height,width,max_pixels,multiple,upscale", [
    (720, 1280, 256 * 256, 16, False), (1080, 1920, 85 * 256, 16, False), (1000, 1370, 64 * 64, 8, False),
    (480, 270, 4000, 16, False), (32, 48, 4096, 16, True), (100, 30, 9000, 10, True), (64, 64, 4096, 16, False),
])
def test_fit_size_closest_aspect_within_budget(height, width, max_pixels, multiple, upscale):
    h, w = fit_size(height, width, max_pixels, multiple, upscale)
    assert h % multiple == 0 and w % multiple == 0 and h * w <= max_pixels
    assert upscale or (h <= height and w <= width)
    assert (h, w) == _fit_by_brute_force(height, width, max_pixels, multiple, upscale)


def test_fit_size_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(150):
        multiple = int(rng.choice([1, 2, 8, 16]))
        height, width = (int(v) for v in rng.integers(multiple, 40 * multiple, 2))
        max_pixels = int(rng.integers(1, 200)) * multiple * multiple + int(rng.integers(0, multiple))
        upscale = bool(rng.integers(2))
        want = _fit_by_brute_force(height, width, max_pixels, multiple, upscale)
        assert fit_size(height, width, max_pixels, multiple, upscale) == want, (height, width, max_pixels, multiple)


def test_fit_size_examples():
    assert fit_size(720, 1280, 256 * 256, 16) == (192, 336)  # 16:9 within 2%, 98% of the budget
    assert fit_size(720, 1280, 256 * 256, 16, aspect_tolerance=0.0) == (144, 256)  # exact 16:9, 56%
    assert fit_size(1024, 768, 256 * 256, 16) == (288, 224)  # 4:3 within 4%, 98% of the budget
    assert fit_size(1024, 768, 256 * 256, 16, aspect_tolerance=0.0) == (256, 192)  # exact 4:3: the largest
    assert fit_size(32, 48, 10**6, 16) == (32, 48)  # no upscale by default
    assert fit_size(32, 48, 96 * 64, 16, allow_upscale=True) == (64, 96)
    assert fit_size(8, 12, 10**6, 16) == (16, 16)  # at least multiple x multiple
    assert fit_size(720, 1280, 100, 16) == (16, 16)
    assert fit_size(2160, 3840, 4096 * 4096, 1) == (2160, 3840)


# ---- resize ---------------------------------------------------------------------------------------------------

def _three_bands(t=2, h=32, w=96):
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:, :, : w // 3] = (255, 0, 0)
    frames[:, :, w // 3: 2 * w // 3] = (0, 255, 0)
    frames[:, :, 2 * w // 3:] = (0, 0, 255)
    return frames


def test_resize_without_crop_keeps_all_content():
    out = resize(_three_bands(), 16, 24)
    assert out.shape == (2, 16, 24, 3) and out.dtype == np.uint8
    assert out[:, :, 1, 0].min() > 200 and out[:, :, 12, 1].min() > 200 and out[:, :, -2, 2].min() > 200


def test_resize_with_crop_keeps_the_centre():
    out = resize(_three_bands(), 16, 16, crop=True)  # 32x96 covered at scale 1/2, then the middle 16 columns
    assert out.shape == (2, 16, 16, 3)
    assert out[..., 1].min() > 220 and out[..., 0].max() < 40 and out[..., 2].max() < 40  # edges: filter ringing
    tall = resize(np.transpose(_three_bands(), (0, 2, 1, 3)).copy(), 20, 20, crop=True)
    assert tall.shape == (2, 20, 20, 3) and tall[..., 1].min() > 220
    same = _three_bands()
    assert resize(same, 32, 96) is same


def test_resize_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        resize(np.zeros((2, 8, 8, 3), np.float32), 4, 4)


# ---- fixture helpers ------------------------------------------------------------------------------------------

def test_write_manifest_lines(tmp_path):
    import json
    path = write_manifest(tmp_path, [("videos/a.mp4", "a cat, naïve"), ("b.png", None)])
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"path": "videos/a.mp4", "caption": "a cat, naïve"}, {"path": "b.png", "caption": None}]
