"""data_pipelines.sources: manifests, ArrayRecord clips, TFDS, skip accounting, DecodeMedia and mixtures.

Media are the tiny real files of tests/media_fixtures.py (32-48 px, <= 20 frames); the TFDS dataset is
built offline in array_record format by tests/tfds_fixture.py.
"""
import collections
import json
import logging
import os
import pickle

import grain
import ml_collections
import numpy as np
import pytest

from data_pipelines import sources
from media_fixtures import make_media_folder, write_manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return root, make_media_folder(root)


@pytest.fixture
def tally(monkeypatch):
    """A fresh SKIPS for the test (DecodeMedia reads the module global at call time)."""
    fresh = sources.SkipTally()
    monkeypatch.setattr(sources, "SKIPS", fresh)
    return fresh


def _cfg(**overrides):
    cfg = dict(source="folder", manifest="m.jsonl", fps=8.0, clip_frames=9, max_sample_tokens=24, crop=False,
               max_pixels=4096 * 4096, max_frames=100_000)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _decode(cfg, source, temporal_stride=4, multiple=8, seed=0, source_size=None):
    transform = sources.DecodeMedia(cfg, temporal_stride=temporal_stride, multiple=multiple,
                                    source_size=source_size or len(source))
    return transform, [transform.random_map(source[i], np.random.default_rng([seed, i])) for i in range(len(source))]


# ------------------------------------------------------------------------------------------------ manifests


def test_manifest_jsonl_and_csv_read_the_same(tmp_path):
    (tmp_path / "v").mkdir()
    lines = [{"path": "v/a.mp4", "caption": "a dog", "extra": 1}, {"path": "v/b.mp4", "caption": ""},
             {"path": "v/c.mp4", "caption": None}, {"path": "v/d.mp4"},
             {"path": "v/e.mp4", "caption": 'two lines, "quoted"\nand a comma'},
             {"path": str(tmp_path / "v/f.mp4"), "caption": "absolute inside the root"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    import csv
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "caption"])
        for i, x in enumerate(lines):
            writer.writerow([i, x["path"], x.get("caption") or ""])
    expected_errors = [None, "missing_caption", "missing_caption", "missing_caption", None, None]
    for name in ("m.jsonl", "m.csv"):
        src = sources.ManifestSource(str(tmp_path / name))
        assert len(src) == len(lines), name
        for i, x in enumerate(lines):
            r = src[i]
            assert r["index"] == i and r["path"] == str(tmp_path / "v" / os.path.basename(x["path"]))
            assert r["name"] == r["path"] and "media" not in r and "frames" not in r
            assert r["caption_error"] == expected_errors[i], (name, i)
            if expected_errors[i] is None:
                assert r["caption"] == x["caption"]


def test_manifest_format_sniffed_without_a_known_suffix(tmp_path):
    (tmp_path / "list.txt").write_text("path,caption\na.mp4,hello\n")
    (tmp_path / "list.lines").write_text('{"path": "a.mp4", "caption": "hi"}\n')
    assert sources.ManifestSource(str(tmp_path / "list.txt"))[0]["caption"] == "hello"
    assert sources.ManifestSource(str(tmp_path / "list.lines"))[0]["caption"] == "hi"


def test_manifest_line_not_utf8_is_a_bad_caption_record(tmp_path):
    good = '{"path": "a.mp4", "caption": "fine"}\n'.encode()
    bad = b'{"path": "b.mp4", "caption": "caf\xe9 au lait"}\n'  # Latin-1, not UTF-8
    (tmp_path / "m.jsonl").write_bytes(good + bad + good)
    (tmp_path / "m.csv").write_bytes(b"path,caption\na.mp4,fine\nb.mp4,caf\xe9\na.mp4,\"fine,\nstill fine\"\n")
    for name in ("m.jsonl", "m.csv"):
        src = sources.ManifestSource(str(tmp_path / name))
        assert [src[i]["caption_error"] for i in range(3)] == [None, "bad_caption", None], name
        assert src[1]["path"] == str(tmp_path / "b.mp4")  # recovered, so the log line names the file


def test_manifest_with_bom_and_utf8_captions(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfpath,caption\na.mp4,na\xc3\xafve caf\xc3\xa9\n")
    r = sources.ManifestSource(str(tmp_path / "m.csv"))[0]
    assert r["caption"] == "naïve café" and r["caption_error"] is None


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_manifest_refuses_paths_outside_the_root(tmp_path, kind):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "x.mp4").write_bytes(b"x")
    (root / "ok.mp4").write_bytes(b"x")
    path = {"dotdot": "sub/../../outside/x.mp4", "absolute": str(outside / "x.mp4"),
            "symlink": "link.mp4", "symlinked_dir": "linkdir/x.mp4"}[kind]
    (root / "link.mp4").symlink_to(outside / "x.mp4")
    (root / "linkdir").symlink_to(outside)
    write_manifest(root, [("ok.mp4", "fine"), (path, "escapes")])
    with pytest.raises(ValueError, match="line 2") as e:
        sources.ManifestSource(str(root / "manifest.jsonl"))
    assert "root" in str(e.value)


def test_manifest_accepts_symlinks_inside_the_root(tmp_path):
    (tmp_path / "real.mp4").write_bytes(b"x")
    (tmp_path / "alias.mp4").symlink_to(tmp_path / "real.mp4")
    write_manifest(tmp_path, [("alias.mp4", "a"), (str(tmp_path / "real.mp4"), "b")])
    assert len(sources.ManifestSource(str(tmp_path / "manifest.jsonl"))) == 2


def test_manifest_root_defaults_to_its_folder_and_can_be_given(tmp_path):
    (tmp_path / "lists").mkdir()
    write_manifest(tmp_path / "lists", [("v/a.mp4", "a")])
    assert sources.ManifestSource(str(tmp_path / "lists/manifest.jsonl"))[0]["path"] == str(tmp_path / "lists/v/a.mp4")
    assert sources.ManifestSource(str(tmp_path / "lists/manifest.jsonl"), str(tmp_path))[0]["path"] == str(
        tmp_path / "v/a.mp4")


@pytest.mark.parametrize("content,match", [
    (b"", "lists no files"), (b"\n  \n", "lists no files"), (b"path,caption\n", "lists no files"),
    (b"path\na.mp4\n", "no 'caption' column"), (b'{"caption": "x"}\n', 'no "path"'),
    (b'{"path": "a.mp4", \n', "not valid JSON")])
def test_manifest_errors(tmp_path, content, match):
    name = "m.csv" if content.startswith(b"path") else "m.jsonl"
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        sources.ManifestSource(str(tmp_path / name))
    with pytest.raises(ValueError, match="cannot read the manifest"):
        sources.ManifestSource(str(tmp_path / "missing.jsonl"))


# -------------------------------------------------------------------------------------------- ArrayRecord


def test_clip_records_round_trip(folder, tmp_path):
    root, info = folder
    entries = [(rel, f"caption of {rel}") for rel in info["good"]] + [(info["good"][0], None)]
    manifest = sources.ManifestSource(str(write_manifest(root, entries, name="records.jsonl")))
    paths = sources.write_clip_records(manifest, str(tmp_path / "shards"), num_shards=3)
    assert [os.path.basename(p) for p in paths] == [f"clips-{k:05d}-of-00003.array_record" for k in range(3)]
    clips = sources.ClipRecordSource(str(tmp_path / "shards/clips-*.array_record"))
    clips = pickle.loads(pickle.dumps(clips))  # grain workers get pickled copies
    assert len(clips) == len(info["good"])  # the record without a caption was left out
    for i, rel in enumerate(info["good"]):
        r = clips[i]
        assert r["index"] == i and r["name"] == str(root / rel) and r["caption"] == f"caption of {rel}"
        assert r["caption_error"] is None and "path" not in r
        assert r["media"] == (root / rel).read_bytes()
    transform, out = _decode(_cfg(source="records", records="x"), clips)
    for example, rel in zip(out, info["good"]):
        want = info["expected"][rel]
        assert example is not None and example["meta"][1:3].tolist() == [want["height"], want["width"]]


def test_clip_records_errors(tmp_path):
    with pytest.raises(ValueError, match="no ArrayRecord shards match"):
        sources.ClipRecordSource(str(tmp_path / "none-*.array_record"))
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "bad.array_record"), "group_size:1")
    writer.write(b"\xc1 not msgpack")
    writer.close()
    r = sources.ClipRecordSource(str(tmp_path / "bad.array_record"))[0]
    assert r["error"] and r["media"] == b""


# ------------------------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tfds_fixture
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_fixture.build(data_dir)
    return str(data_dir)


def test_tfds_source_gives_uint8_frames(tfds_dir, tally):
    import tfds_fixture as fx
    src = sources.TfdsSource(fx.NAME, "train", data_dir=tfds_dir)
    src = pickle.loads(pickle.dumps(src))
    assert len(src) == len(fx.EXAMPLES)
    # TFDS stores examples in a shuffled order: frame 0 of example k has grey level 10 * k.
    order = [int(src[i]["frames"][0, 0, 0, 0]) // 10 for i in range(len(src))]
    assert sorted(order) == list(range(len(fx.EXAMPLES)))
    for key in ("video", "clip", "still"):
        by_key = sources.TfdsSource(fx.NAME, "train", tfds_dir, video_key=key)
        for i, k in enumerate(order):
            r = by_key[i]
            assert r["frames"].dtype == np.uint8 and r["name"] == f"tfds:{fx.NAME}/train[{i}]"
            want = fx.video(k)[:1] if key == "still" else fx.video(k)
            np.testing.assert_array_equal(r["frames"], want)
            assert r["fps"] == fx.EXAMPLES[k][2] and "path" not in r and "media" not in r
    at = {k: i for i, k in enumerate(order)}
    assert src[at[0]]["caption"] == "a red ball rolls" and src[at[1]]["caption"] == "a café at night, in the rain"
    assert [src[at[k]]["caption_error"] for k in range(4)] == [None, None, "bad_caption", "missing_caption"]

    transform, out = _decode(_cfg(source="tfds", tfds_name=fx.NAME, fps=8.0), src)
    assert out[at[2]] is None and out[at[3]] is None
    assert tally.drain() == {"bad_caption": 1, "missing_caption": 1}
    # Example 1 is stored at 16 fps: every other frame is taken, at 8 fps (5 frames: 6 of its 12 remain).
    one = out[at[1]]
    assert one["video"].shape == (5, 16, 24, 3) and one["meta"][0] == 8.0
    levels = np.round((one["video"][:, 0, 0, 0] + 1) * 127.5) - 10
    assert np.all(np.diff(levels) == 2)
    assert out[at[0]]["video"].shape == (9, 16, 24, 3) and out[at[0]]["meta"].tolist() == [8.0, 16, 24, 9 / 8]


def test_tfds_source_errors_are_clear(tmp_path, tfds_dir):
    import tfds_fixture as fx
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'no_such_set'"):
        sources.TfdsSource("no_such_set", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no feature 'frames'.*tfds_video_key"):
        sources.TfdsSource(fx.NAME, "train", data_dir=tfds_dir, video_key="frames")


# ---------------------------------------------------------------------------------------- skip accounting


def test_skip_tally_counts_drains_and_logs_once_per_file(caplog):
    tally = sources.SkipTally()
    with caplog.at_level(logging.WARNING, logger="data_pipelines.sources"):
        tally.record("corrupt", "/data/a.mp4", "broken")
        tally.record("corrupt", "/data/a.mp4", "broken")
        tally.record("empty", "/data/b.mp4")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "/data/a.mp4 (corrupt)" in warnings[0] and "/data/b.mp4 (empty)" in warnings[1]
    assert tally.drain() == {"corrupt": 2, "empty": 1} and tally.drain() == {}
    tally.record("empty", "/data/c.mp4")
    assert tally.drain() == {"empty": 1} and tally.totals() == {"corrupt": 2, "empty": 2}
    with pytest.raises(ValueError, match="not one of"):
        tally.record("sad", "x")


# ------------------------------------------------------------------------------------------------ decoding


def test_decode_media_skips_each_bad_file_with_its_reason(folder, tally, caplog):
    root, info = folder
    bad = sorted(info["bad"])
    good = info["good"][0]
    entries = [(rel, "a caption") for rel in bad] + [(good, None), (good, "fine")]
    manifest = write_manifest(root, entries, name="bad.jsonl")
    with open(manifest, "ab") as f:  # a line that is not UTF-8
        f.write(b'{"path": "' + good.encode() + b'", "caption": "caf\xe9"}\n')
    src = sources.ManifestSource(str(manifest))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.sources"):
        _, out = _decode(_cfg(), src)
    assert [o is None for o in out] == [True] * len(bad) + [True, False, True]
    want = collections.Counter(info["bad"].values())
    want.update(["missing_caption", "bad_caption"])
    assert tally.drain() == dict(want)
    logged = " ".join(r.getMessage() for r in caplog.records)
    for rel, reason in info["bad"].items():
        assert f"{root / rel} ({reason})" in logged


def test_decode_media_obeys_the_token_budget_and_frame_rule(folder, tally):
    root, info = folder
    src = sources.ManifestSource(str(write_manifest(root, [(rel, "x") for rel in info["good"]], name="good.jsonl")))
    for budget, clip_frames, want_max_t in ((24, 9, 9), (2, 9, 5), (1, 9, 1), (48, 20, 17)):
        cfg = _cfg(max_sample_tokens=budget, clip_frames=clip_frames, fps=0.0)
        transform, out = _decode(cfg, src)
        assert transform.max_clip == want_max_t
        for example, rel in zip(out, info["good"]):
            want = info["expected"][rel]
            t, h, w, c = example["video"].shape
            assert example["video"].dtype == np.float32 and c == 3
            assert -1.0 <= example["video"].min() and example["video"].max() <= 1.0
            assert (t - 1) % 4 == 0 and t <= want_max_t and h % 8 == 0 and w % 8 == 0
            assert (1 + (t - 1) // 4) * (h // 8) * (w // 8) <= max(budget, 1)
            assert (h, w) == transform.target_size(t, want["height"], want["width"])
            # The longest clip the file allows, up to the budget's limit.
            assert t == (1 if want["kind"] == "image" else min(want_max_t, 1 + (want["frames"] - 1) // 4 * 4))
            fps, oh, ow, duration = example["meta"].tolist()
            assert (oh, ow) == (want["height"], want["width"]) and fps == pytest.approx(want["fps"])
            assert duration == pytest.approx(t / fps if fps else 0.0)
            assert example["caption"] == "x" and example["index"] == info["good"].index(rel)
    assert tally.drain() == {}


def test_decode_media_resamples_to_the_configured_fps_and_keeps_the_aspect(folder):
    root, info = folder
    tall = next(rel for rel in info["good"] if "tall" in rel)  # 32x48 px, 20 frames at 16 fps
    src = sources.ManifestSource(str(write_manifest(root, [(tall, "x")], name="tall.jsonl")))
    transform = sources.DecodeMedia(_cfg(fps=8.0, max_sample_tokens=64), 4, 8, source_size=1)
    example = transform.random_map(src[0], np.random.default_rng(0))
    assert example["meta"][0] == 8.0 and example["video"].shape == (9, 24, 16, 3)  # 3 latent frames x 3x2 <= 64
    cropped = sources.DecodeMedia(_cfg(fps=8.0, max_sample_tokens=64, crop=True), 4, 8, source_size=1)
    assert cropped.random_map(src[0], np.random.default_rng(0))["video"].shape == (9, 24, 16, 3)


def test_decode_media_limits_come_from_the_config(folder, tally):
    root, info = folder
    src = sources.ManifestSource(str(write_manifest(root, [(info["good"][0], "x")], name="one.jsonl")))
    _, out = _decode(_cfg(max_pixels=100), src, source_size=10)
    assert out == [None] and tally.drain() == {"too_large": 1}
    _, out = _decode(_cfg(max_frames=3), src, source_size=10)
    assert out == [None] and tally.drain() == {"too_large": 1}


def test_no_readable_examples(folder, tally):
    root, info = folder
    bad = sorted(info["bad"])
    src = sources.ManifestSource(str(write_manifest(root, [(rel, "x") for rel in bad], name="allbad.jsonl")))
    transform = sources.DecodeMedia(_cfg(), 4, 8, source_size=len(src))
    transform = pickle.loads(pickle.dumps(transform))
    for i in range(len(src) - 1):
        assert transform.random_map(src[i], np.random.default_rng(i)) is None
    with pytest.raises(sources.NoReadableExamples, match=f"all {len(src)} records") as e:
        transform.random_map(src[len(src) - 1], np.random.default_rng(0))
    assert "m.jsonl" in str(e.value) and "corrupt" in str(e.value)

    # One good record ever read: bad ones after it are skipped, never fatal.
    mixed = sources.ManifestSource(str(write_manifest(root, [(info["good"][0], "x")] + [(r, "x") for r in bad],
                                                     name="mixed.jsonl")))
    transform = sources.DecodeMedia(_cfg(), 4, 8, source_size=len(mixed))
    for i in list(range(len(mixed))) * 3:
        transform.random_map(mixed[i], np.random.default_rng(i))


def test_decode_media_in_a_grain_pipeline_drops_skipped_records(folder, tally):
    root, info = folder
    entries = [(info["good"][0], "a"), (sorted(info["bad"])[0], "b"), (info["good"][1], "c")]
    src = sources.ManifestSource(str(write_manifest(root, entries, name="grain.jsonl")))
    transform = sources.DecodeMedia(_cfg(), 4, 8, source_size=len(src))
    ds = grain.MapDataset.source(src).random_map(transform, seed=3)
    first = [x["caption"] for x in ds.to_iter_dataset()]
    assert first == ["a", "c"] and tally.drain() == {info["bad"][sorted(info["bad"])[0]]: 1}
    again = [x["video"] for x in ds.to_iter_dataset()]
    assert all(np.array_equal(a, b) for a, b in zip(again, [ds[0]["video"], ds[2]["video"]]))


# ------------------------------------------------------------------------------------------------ mixtures


def _component(tag, n):
    return grain.MapDataset.source([(tag, i) for i in range(n)])


def test_mixture_shares_and_determinism():
    mixed = sources.mixture([_component("a", 7).repeat(), _component("b", 5).repeat()], [0.7, 0.3], seed=1)
    draws = [mixed[k] for k in range(1000)]
    share = np.mean([tag == "a" for tag, _ in draws])
    assert abs(share - 0.7) < 0.02
    again = sources.mixture([_component("a", 7).repeat(), _component("b", 5).repeat()], [0.7, 0.3], seed=1)
    assert [again[k] for k in range(1000)] == draws
    # Components are read front to back, permuted only within a period (here 233 + 100 positions): the
    # first three periods hold a's first 699 elements and b's first 300, each once.
    big = sources.mixture([_component("a", 10**6), _component("b", 10**6)], [0.7, 0.3], seed=1)
    keys = sorted(big[k] for k in range(999))
    assert keys == [("a", i) for i in range(699)] + [("b", i) for i in range(300)]
    other = sources.mixture([_component("a", 7).repeat(), _component("b", 5).repeat()], [0.7, 0.3], seed=2)
    assert [other[k] for k in range(1000)] != draws


def test_mixture_gives_each_host_stride_the_right_share():
    # grain's plain mix of equal weights alternates a, b, a, b: host 0 of 2 would read only "a".
    mixed = sources.mixture([_component("a", 3).repeat(), _component("b", 3).repeat()], [1.0, 1.0])
    for hosts in (2, 4):
        for p in range(hosts):
            stride = mixed[p::hosts]  # what pipeline.packed_dataset gives host p
            share = np.mean([stride[k][0] == "a" for k in range(400)])
            assert 0.4 < share < 0.6, (hosts, p, share)


def test_mixture_of_finite_components():
    mixed = sources.mixture([_component("a", 70), _component("b", 50)], [0.7, 0.3])
    assert len(mixed) == 100  # ends when the first component runs out: a's 70 at a share of 0.7
    items = [mixed[k] for k in range(len(mixed))]
    assert len(set(items)) == 100 and sum(tag == "a" for tag, _ in items) == 70
    with pytest.raises(ValueError, match="one weight per dataset"):
        sources.mixture([_component("a", 3)], [0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        sources.mixture([_component("a", 3), _component("b", 3)], [1.0, 0.0])
