"""`python -m data_pipelines.prepare`: manifest from a media folder, skipped report, captions, captioner plug-in.

The captioner is a tiny random ViT + GPT-2 encoder-decoder built and saved here (no downloads), so its
captions are nonsense words, but they are real generations through the same loading path a downloaded
model takes.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + "a cat dog red blue sky sea tree runs jumps over the".split()


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    """A saved random image-to-text model: ViT (32x32 images, hidden 32, 1 layer) + GPT-2 (1 layer)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data_pipelines.captioners import quiet_transformers
    path = str(tmp_path_factory.mktemp("captioner"))
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    encoder = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8)
    decoder = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    with quiet_transformers():
        torch.manual_seed(0)
        model = transformers.VisionEncoderDecoderModel(config=config)
        # Random weights may well put </s> first (an empty caption); a bias against the special tokens
        # makes the test about the plumbing, not about luck.
        with torch.no_grad():
            model.decoder.lm_head.weight[:4] = 0.0
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        processor_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
        processor_cls(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _frames(seed, n=3, shape=(24, 40)):
    return [np.random.default_rng(seed + k).integers(0, 256, (*shape, 3), dtype=np.uint8) for k in range(n)]


def test_captioner_is_deterministic(captioner_dir):
    from data_pipelines.captioners import CAPTIONERS, Captioner, build_captioner
    captioner = build_captioner("hf", captioner_dir, max_new_tokens=6)
    assert isinstance(captioner, Captioner) and CAPTIONERS["hf"] is type(captioner)
    first = captioner.caption(_frames(0))
    assert isinstance(first, str) and first.strip()
    assert set(first.split()) <= set(WORDS[4:])
    assert captioner.caption(_frames(0)) == first
    # Only the middle frame counts.
    assert captioner.caption(_frames(0)[1:2]) == first
    # A prompt conditions the decoder and is stripped from the result.
    prompted = build_captioner("hf", captioner_dir, max_new_tokens=6, prompt="a cat")
    assert prompted.caption(_frames(0)).strip() and not prompted.caption(_frames(0)).startswith("a cat")


def test_captioner_refuses_bad_paths(tmp_path):
    from data_pipelines.captioners import CaptionerError, build_captioner
    with pytest.raises(CaptionerError, match="not a directory"):
        build_captioner("hf", str(tmp_path / "missing"))
    with pytest.raises(CaptionerError, match="config.json"):
        build_captioner("hf", str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CaptionerError, match="pickle"):
        build_captioner("hf", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CaptionerError, match="could not be loaded"):
        build_captioner("hf", str(tmp_path))
    with pytest.raises(CaptionerError, match="unknown captioner kind"):
        build_captioner("nope", str(tmp_path))


@pytest.fixture
def folder(tmp_path):
    """The media fixture folder with a captions CSV (one caption not UTF-8) and two sidecars (one not UTF-8)."""
    from media_fixtures import make_media_folder
    root = tmp_path / "media"
    made = make_media_folder(root)
    (root / "videos/wide_h264.mp4.txt").write_text("a red square moves right\n")
    (root / "images/still.txt").write_text("a still gradient")
    (root / "images/photo.jpg.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8")
    captions = tmp_path / "captions.csv"
    captions.write_bytes(b'path,caption\n'
                         b'videos/tall_h264.mp4,"a green square, rising"\n'
                         b'images/really_png.mp4,\xff\xfe not UTF-8\n'
                         b'videos/wide_h264.mp4,the file wins over the sidecar\n'
                         b'videos/gone.mp4,a file that is not there\n')
    return root, captions, made


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_manifest(lines, made, root):
    assert [entry["path"] for entry in lines] == sorted(made["good"])
    for line in lines:
        want = made["expected"][line["path"]]
        for key in ("kind", "width", "height", "frames", "codec"):
            assert line[key] == want[key], (line, key)
        assert line["fps"] == pytest.approx(want["fps"], abs=0.01)
        duration = want["frames"] / want["fps"] if want["fps"] else 0.0
        assert line["duration"] == pytest.approx(duration, abs=0.1)
        assert not os.path.isabs(line["path"]) and str(root) not in json.dumps(line)  # nothing absolute


def test_prepare_manifest_report_and_captions(folder, tmp_path):
    from data_pipelines import prepare
    root, captions, made = folder
    out = str(root / "manifest.jsonl")
    # A symlink out of the folder (the training source refuses those) and a name that is not UTF-8.
    (tmp_path / "outside.png").write_bytes((root / "images/still.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "videos/link.png")
    with open(os.path.join(os.fsencode(root), b"images/caf\xe9.png"), "wb") as f:
        f.write((root / "images/still.png").read_bytes())
    summary = prepare.prepare_manifest(str(root), out, captions=str(captions), progress=False)
    lines = _read_jsonl(out)
    _check_manifest(lines, made, root)
    got = {entry["path"]: entry.get("caption") for entry in lines}
    assert got["videos/tall_h264.mp4"] == "a green square, rising"
    assert got["videos/wide_h264.mp4"] == "the file wins over the sidecar"
    assert got["images/still.png"] == "a still gradient"  # sidecar without the media extension
    assert got["images/photo.jpg"] is None and got["images/really_png.mp4"] is None  # not UTF-8: absent
    assert got["videos/square_vp9.webm"] is None

    report = _read_jsonl(prepare.report_path(out))
    skipped = {r["path"]: r["reason"] for r in report if r["skipped"]}
    assert skipped == {**made["bad"], "videos/link.png": "outside_root", "images/caf\ufffd.png": "bad_name"}
    assert all(r["detail"] for r in report)
    bad_captions = {r["path"] for r in report if r["reason"] == "bad_caption"}
    assert bad_captions == {"images/photo.jpg", "images/really_png.mp4"}
    assert summary.written == len(made["good"]) and summary.skipped == len(made["bad"]) + 2
    assert summary.unmatched_captions == 1 and summary.uncaptioned == 4

    # The training source reads it as written (root defaults to the manifest's folder).
    from data_pipelines import sources
    records = sources.ManifestSource(out)
    read = [records[i]["path"] for i in range(len(records))]
    assert read == [str(root / entry["path"]) for entry in lines]

    text = prepare.format_summary(summary, str(root))
    assert "corrupt: 2 skipped" in text and "bad_caption: 2 kept" in text and ",root=" not in text

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare_manifest(str(root), out, progress=False)
    prepare.prepare_manifest(str(root), out, overwrite=True, progress=False)
    assert "caption" not in _read_jsonl(out)[-1]  # rewritten, now without the captions file


def test_caption_files_csv_and_jsonl(tmp_path):
    from data_pipelines.prepare import load_captions
    (tmp_path / "c.jsonl").write_bytes(b'{"path": "a.mp4", "caption": "one"}\n\n'
                                       b'{"path": "sub/../b.mp4", "caption": "two"}\n'
                                       b'{"path": "c.mp4", "caption": "\xc3\x28"}\n'
                                       b'{"path": "d.mp4", "caption": null}\n')
    captions, problems = load_captions(str(tmp_path / "c.jsonl"), str(tmp_path))
    assert captions == {"a.mp4": "one", "b.mp4": "two"}
    assert [(p["path"], p["reason"]) for p in problems] == [("c.mp4", "bad_caption")]
    (tmp_path / "c.csv").write_text("a.mp4,one,two\n")
    with pytest.raises(ValueError, match="line 1 has 3 fields"):
        load_captions(str(tmp_path / "c.csv"), str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match='line 1 has no "path"'):
        load_captions(str(tmp_path / "d.jsonl"), str(tmp_path))


class _FailsOnImages:
    """A captioner plug-in that works on video frames and raises on stills (square 32x32 here)."""

    def __init__(self):
        self.calls = 0

    def caption(self, frames):
        self.calls += 1
        if frames[0].shape[:2] == (32, 32):
            raise RuntimeError("cannot caption this one")
        return f"clip of {frames[0].shape[0]}x{frames[0].shape[1]}"


def test_captioner_failures(folder):
    from data_pipelines import prepare
    root, _, made = folder
    out = str(root / "m.jsonl")
    summary = prepare.prepare_manifest(str(root), out, captioner=_FailsOnImages(), recaption=True, progress=False)
    got = {entry["path"]: entry.get("caption") for entry in _read_jsonl(out)}
    assert got["videos/tall_h264.mp4"] == "clip of 48x32"
    assert got["videos/wide_h264.mp4"] == "clip of 32x48"
    assert got["images/really_png.mp4"] is None  # failed: left absent, file kept
    assert got["images/still.png"] == "clip of 32x48"
    assert summary.problems["caption_failed"] == 1 and summary.written == len(made["good"])

    class Broken:
        def caption(self, frames):
            raise RuntimeError("model is broken")
    with pytest.raises(ValueError, match="first 3 files .* model is broken"):
        prepare.prepare_manifest(str(root), str(root / "n.jsonl"), captioner=Broken(), progress=False)
    assert not os.path.exists(root / "n.jsonl")
    with pytest.raises(ValueError, match="--recaption needs --captioner"):
        prepare.prepare_manifest(str(root), str(root / "n.jsonl"), recaption=True)


def test_prepare_with_captioner_in_process_and_cli(folder, captioner_dir, tmp_path):
    from data_pipelines import prepare
    from data_pipelines.captioners import build_captioner
    root, captions, made = folder
    captioner = build_captioner("hf", captioner_dir, max_new_tokens=5)
    out = str(tmp_path / "in_process.jsonl")
    summary = prepare.prepare_manifest(str(root), out, captions=str(captions), captioner=captioner,
                                       progress=False)
    lines = _read_jsonl(out)
    _check_manifest(lines, made, root)
    got = {entry["path"]: entry.get("caption") for entry in lines}
    assert got["videos/tall_h264.mp4"] == "a green square, rising"  # given captions are kept
    for rel in ("videos/square_vp9.webm", "videos/wide_vp8.webm", "images/photo.jpg", "images/really_png.mp4"):
        assert isinstance(got[rel], str) and got[rel].strip(), rel
    assert summary.caption_sources["captioner"] == 4 and summary.uncaptioned == 0

    # The entry point: same manifest (deterministic captions), a quiet console, refuses to overwrite.
    cli_out = str(tmp_path / "cli" / "manifest.jsonl")
    cmd = [sys.executable, "-m", "data_pipelines.prepare", f"--videos={root}", f"--out={cli_out}",
           f"--captions={captions}", f"--captioner={captioner_dir}", "--caption_max_new_tokens=5"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _read_jsonl(cli_out) == lines
    assert f"Wrote {len(made['good'])} files" in run.stdout and f",root={root}" in run.stdout
    console = run.stdout + run.stderr
    assert "skipped bad/" not in console and "Loading weights" not in console and "I1" not in console
    assert "skipped bad/junk.mp4: corrupt" in open(cli_out + ".log").read()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr
    bad = subprocess.run(cmd[:-2] + [f"--captioner={tmp_path / 'nowhere'}", "--overwrite"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not a directory" in bad.stderr
    assert _read_jsonl(cli_out) == lines  # the failed run touched nothing
