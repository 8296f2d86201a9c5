r"""Build a training manifest from a folder of videos and images.

  python -m data_pipelines.prepare --videos=DIR --out=DIR/manifest.jsonl \
      [--captions=captions.csv] [--captioner=HF_MODEL_DIR [--recaption]] [--max_pixels=N --max_frames=N]

Walks DIR recursively in sorted order and probes every file by its content (data_pipelines.media.probe:
headers only, nothing is decoded in full). Text sidecars and logs (.txt/.json/.jsonl/.csv/.log) and this
tool's own outputs are not probed. Each readable file becomes one JSONL line

  {"path": "sub/clip.mp4", "caption": "...", "kind": "video", "width": 640, "height": 360, "frames": 120,
   "fps": 24.0, "duration": 5.0, "codec": "h264"}

`path` is relative to DIR and the manifest stores nothing absolute, so DIR can move. Training reads it with
`--config.data.source=folder --config.data.manifest=OUT --config.data.root=DIR`; root may be left out when the
manifest lives in DIR itself (root defaults to the manifest's directory).

Captions, first match wins: the --captions file (CSV `path,caption` with an optional header, or JSONL
{"path", "caption"}; paths relative to DIR), then a sidecar text file beside the media file (`clip.mp4.txt`,
else `clip.txt`), then the --captioner plug-in (data_pipelines.captioners) for files still without one;
--recaption runs the captioner on every file. A caption that is not UTF-8 is reported and left absent. A file
left without a caption stays in the manifest (training skips it as "missing_caption").

Files that cannot be used are skipped and reported: counts per reason and a few names on the console, every
file with its reason in the log (`<out>.log` unless --log_dir/--logtostderr) and in `<out>.skipped.jsonl`, which
also lists the bad captions (with "skipped": false: the file itself is kept). Reasons are media.SKIP_REASONS
plus this tool's own: "unreadable" (the OS refused to read it), "outside_root" (a symlink leading out of
DIR, which the training source would refuse), "bad_name" (a file name that is not UTF-8 and so cannot be
written to a UTF-8 manifest) and "caption_failed" (the captioner raised; the file is kept).

Outputs are written to a temporary name and renamed when complete; an existing --out is refused unless
--overwrite.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Iterable

from absl import app, flags, logging

from data_pipelines import media

# Extensions never probed: captions, manifests, metadata and logs that commonly sit beside the media.
SIDECAR_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".log")
PREPARE_REASONS = ("unreadable", "outside_root", "bad_name", "caption_failed")
# Problems after which the file is still written to the manifest (without the bad caption).
KEPT_REASONS = ("bad_caption", "caption_failed")
# Frames handed to the captioner, centred on the middle of the clip.
CAPTION_FRAMES = 3
# The captioner is judged broken (rather than one file bad) when its first this many attempts all fail.
CAPTIONER_PROBATION = 3
SUMMARY_EXAMPLES = 3


@dataclasses.dataclass
class Summary:
    """What a prepare run did; `format_summary` renders it for the console."""
    manifest: str
    report: str
    written: int = 0
    # reason -> count, for skipped files and for kept files with a caption problem (KEPT_REASONS) alike.
    problems: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first few relative paths
    caption_sources: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    uncaptioned: int = 0
    unmatched_captions: int = 0

    @property
    def skipped(self) -> int:
        """Files left out of the manifest."""
        return sum(n for r, n in self.problems.items() if r not in KEPT_REASONS)

    def note(self, reason: str, path: str) -> None:
        """Counts one problem and keeps the first few file names per reason."""
        self.problems[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < SUMMARY_EXAMPLES:
            names.append(path)


def report_path(out: str) -> str:
    """The skipped-files report written beside the manifest `out`."""
    return out + ".skipped.jsonl"


def _rel(path: str, root: str) -> str:
    """`path` relative to `root`, with forward slashes (manifests are portable across systems)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def find_files(root: str, exclude: Iterable[str] = ()) -> list[str]:
    """Every candidate media file under `root`, as sorted relative paths.

    Parameters
    ----------
    root : str
        Folder to walk (recursively; symlinked folders are not followed, which avoids cycles).
    exclude : iterable of str
        Paths (any form) never returned, e.g. the manifest being written.

    Returns
    -------
    list of str
        Relative paths with forward slashes, sorted, without sidecar extensions (SIDECAR_EXTENSIONS).
    """
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if name.lower().endswith(SIDECAR_EXTENSIONS) or os.path.realpath(full) in excluded:
                continue
            found.append(_rel(full, root))
    return sorted(found)


def _clean_caption(text: str | None, where: str) -> tuple[str | None, str | None]:
    """(caption or None, problem or None): strips it; a caption that cannot be UTF-8 is a problem."""
    if text is None:
        return None, None
    if not isinstance(text, str):
        return None, f"{where}: caption is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that were not UTF-8 arrive as lone surrogates (surrogateescape / \\udcXX escapes).
        return None, f"{where}: caption is not valid UTF-8"
    return text.strip() or None, None


def _caption_rows(path: str) -> Iterable[tuple[int, str, object]]:
    """(line number, path, caption) from a CSV or JSONL captions file."""
    with open(path, "rb") as f:
        # surrogateescape keeps undecodable bytes so each line can be judged on its own.
        text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    is_jsonl = path.lower().endswith((".jsonl", ".json")) or (
        not path.lower().endswith(".csv") and text.lstrip().startswith("{"))
    if is_jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--captions={path} line {n} is not JSON ({e}); expected "
                                 '{"path": ..., "caption": ...} per line.') from e
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise ValueError(f'--captions={path} line {n} has no "path" string; expected '
                                 '{"path": ..., "caption": ...} per line.')
            yield n, row["path"], row.get("caption")
        return
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if not row or (n == 1 and [c.strip().lower() for c in row] == ["path", "caption"]):
            continue
        if len(row) != 2:
            raise ValueError(f"--captions={path} line {n} has {len(row)} fields, expected 2 (path,caption); "
                             'quote captions that contain commas ("a, b").')
        yield n, row[0], row[1]


def load_captions(path: str, root: str) -> tuple[dict[str, str], list[dict]]:
    """Reads a captions file into {relative path: caption}.

    Parameters
    ----------
    path : str
        CSV (`path,caption`, optional header) or JSONL ({"path", "caption"}) file. Paths are relative to
        `root`, or absolute inside it.
    root : str
        The media folder.

    Returns
    -------
    captions : dict
        Relative path (forward slashes) -> caption; later lines override earlier ones.
    problems : list of dict
        {"path", "reason": "bad_caption", "detail"} for captions that are not UTF-8.

    Raises
    ------
    ValueError
        A missing file or a malformed line (named with its number).
    """
    if not os.path.isfile(path):
        raise ValueError(f"--captions={path} does not exist; give a CSV (path,caption) or JSONL file.")
    captions, problems = {}, []
    for n, name, caption in _caption_rows(path):
        rel = _printable(_rel(name if os.path.isabs(name) else os.path.join(root, name), root))
        text, problem = _clean_caption(caption, f"{path} line {n}")
        if problem:
            problems.append({"path": rel, "reason": "bad_caption", "detail": problem})
            captions.pop(rel, None)
        elif text is not None:
            if rel in captions:
                logging.warning("%s line %d: a second caption for %s replaces the first", path, n, rel)
            captions[rel] = text
    return captions, problems


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(text: str) -> str:
    """`text` with undecodable bytes (surrogate escapes) shown as U+FFFD, so it can be logged and reported."""
    return text if _utf8(text) else text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_sidecar(full: str) -> tuple[str | None, str | None, str | None]:
    """(caption, problem, sidecar path) from `clip.mp4.txt`, else `clip.txt`, beside `full`."""
    for side in (full + ".txt", os.path.splitext(full)[0] + ".txt"):
        if os.path.isfile(side):
            with open(side, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                return None, f"{side}: caption is not valid UTF-8 ({e.reason} at byte {e.start})", side
            return text.strip() or None, None, side
    return None, None, None


def caption_frames(full: str, info: media.MediaInfo, limits: media.Limits) -> list:
    """A few frames around the middle of the file (one for an image), for a captioner."""
    start = None
    if info.kind == "video" and info.fps > 0:
        start = max(0.0, info.duration / 2 - (CAPTION_FRAMES // 2) / info.fps)
    frames, _ = media.decode(full, fps=0.0, max_frames=CAPTION_FRAMES, start=start, limits=limits)
    return list(frames)


def _open_outputs(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out={out} already exists; pass --overwrite to replace it, or choose a new name.")
    if os.path.isdir(out):
        raise FileExistsError(f"--out={out} is a directory; give a file name such as {out}/manifest.jsonl.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)


def _write_atomic(path: str, lines: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class _Captioning:
    """Runs the captioner on one file; tells a broken captioner from one bad file."""

    def __init__(self, captioner, limits: media.Limits):
        self.captioner, self.limits = captioner, limits
        self.attempts = self.successes = 0

    def __call__(self, full: str, info: media.MediaInfo) -> str | None:
        """The caption, or None if empty. Raises media.BadMedia (the file does not decode), _CaptionFailed
        (this file), or ValueError when the first attempts all failed (the model, not the file, is at fault)."""
        frames = caption_frames(full, info, self.limits)
        self.attempts += 1
        try:
            text = self.captioner.caption(frames)
        except Exception as e:  # a plug-in may raise anything; judged below
            if self.successes == 0 and self.attempts >= CAPTIONER_PROBATION:
                raise ValueError(f"the captioner failed on each of the first {self.attempts} files it tried "
                                 f"(last {full}: {type(e).__name__}: {e}); check the --captioner model. "
                                 "No manifest written.") from e
            raise _CaptionFailed(f"{type(e).__name__}: {e}") from e
        self.successes += 1
        return (text or "").strip() or None


class _CaptionFailed(Exception):
    pass


def _one_file(rel: str, root: str, real_root: str, limits: media.Limits, captions: dict,
              captioning: _Captioning | None, recaption: bool, problems: list, summary: Summary) -> dict | None:
    """The manifest line for one file, or None (the problem is recorded in `problems` and `summary`)."""
    full = os.path.join(root, rel)

    def skip(reason: str, detail: str) -> None:
        logging.warning("skipped %s: %s (%s)", _printable(rel), reason, detail)
        problems.append({"path": _printable(rel), "reason": reason, "detail": detail, "skipped": True})
        summary.note(reason, _printable(rel))

    if not _utf8(rel):
        return skip("bad_name", "the file name is not valid UTF-8; rename the file")
    if os.path.commonpath([os.path.realpath(full), real_root]) != real_root:
        return skip("outside_root", f"a symlink to {os.path.realpath(full)}, outside --videos")
    try:
        info = media.probe(full, limits)
    except media.BadMedia as e:
        return skip(e.reason, str(e))
    except OSError as e:
        return skip("unreadable", f"{type(e).__name__}: {e}")

    caption, source = captions.get(rel), "captions file"
    if caption is None:
        caption, problem, _ = read_sidecar(full)
        source = "sidecar"
        if problem:
            logging.warning("%s: %s; that caption is ignored", rel, problem)
            problems.append({"path": rel, "reason": "bad_caption", "detail": problem, "skipped": False})
            summary.note("bad_caption", rel)
    if captioning is not None and (caption is None or recaption):
        try:
            made = captioning(full, info)
        except media.BadMedia as e:
            return skip(e.reason, f"probed, but decoding for the captioner failed: {e}")
        except _CaptionFailed as e:
            made = None
            detail = f"the captioner failed ({e}); caption {'kept from ' + source if caption else 'left absent'}"
            logging.exception("%s: %s", rel, detail)
            problems.append({"path": rel, "reason": "caption_failed", "detail": detail, "skipped": False})
            summary.note("caption_failed", rel)
        if made is not None:
            caption, source = made, "captioner"
    line = {"path": rel}
    if caption is not None:
        line["caption"] = caption
        summary.caption_sources[source] += 1
    else:
        summary.uncaptioned += 1
    line.update(dataclasses.asdict(info))
    logging.info("%s: %s", rel, line)
    return line


def prepare_manifest(videos: str, out: str, captions: str = "", captioner=None, recaption: bool = False,
                     limits: media.Limits = media.Limits(), overwrite: bool = False,
                     progress: bool = True) -> Summary:
    """Probes every file under `videos` and writes the manifest `out` and its skipped report.

    Parameters
    ----------
    videos : str
        The media folder (DIR).
    out : str
        Manifest path (JSONL). Refused if it exists, unless `overwrite`.
    captions : str
        Optional CSV/JSONL captions file (see the module docstring).
    captioner : data_pipelines.captioners.Captioner, optional
        Called on the frames of files without a caption (every file with `recaption`).
    recaption : bool
        Caption every file with `captioner`, replacing given captions.
    limits : media.Limits
        Files over these limits are skipped as "too_large".
    overwrite : bool
        Replace an existing `out`.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    Summary
        Counts of what was written and skipped.

    Raises
    ------
    ValueError
        Bad arguments, a malformed captions file, or no readable media at all (the report is still written).
    FileExistsError
        `out` exists and `overwrite` is False.
    """
    from tqdm import tqdm

    if not os.path.isdir(videos):
        raise ValueError(f"--videos={videos} is not a directory; give the folder that holds the media files.")
    if recaption and captioner is None:
        raise ValueError("--recaption needs --captioner=MODEL_DIR.")
    _open_outputs(out, overwrite)
    summary = Summary(manifest=out, report=report_path(out))
    given, problems = load_captions(captions, videos) if captions else ({}, [])
    for p in problems:
        logging.warning("%s: %s; that caption is ignored", p["path"], p["detail"])
        p["skipped"] = False
        summary.note("bad_caption", p["path"])
    files = find_files(videos, exclude=(out, out + ".tmp", out + ".log", summary.report, summary.report + ".tmp"))
    unmatched = sorted(set(given) - set(files))
    summary.unmatched_captions = len(unmatched)
    for rel in unmatched:
        logging.warning("--captions names %s, which is not a media file under %s", rel, videos)

    captioning = _Captioning(captioner, limits) if captioner is not None else None
    real_root, lines = os.path.realpath(videos), []
    bar = tqdm(files, unit="file", desc="prepare", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5)
    for rel in bar:
        line = _one_file(rel, videos, real_root, limits, given, captioning, recaption, problems, summary)
        if line is not None:
            lines.append(line)
        bar.set_postfix(ok=len(lines), skipped=summary.skipped, refresh=False)
    bar.close()
    summary.written = len(lines)
    _write_atomic(summary.report, problems)
    if not lines:
        found = f"{len(files)} files probed: {dict(summary.problems)}" if files else "no files besides sidecars"
        raise ValueError(f"no readable media under {videos} ({found}); see {summary.report}. No manifest written.")
    _write_atomic(out, lines)
    return summary


def format_summary(summary: Summary, videos: str) -> str:
    """A few console lines: what was written, what was skipped and why, how to train on it."""
    lines = [f"Wrote {summary.written} files to {summary.manifest}"
             + (f"; skipped {summary.skipped}" if summary.skipped else "")]
    for reason, count in sorted(summary.problems.items()):
        shown = summary.examples.get(reason, [])
        what = "kept without that caption" if reason in KEPT_REASONS else "skipped"
        lines.append(f"  {reason}: {count} {what} ({', '.join(shown)}{', ...' if count > len(shown) else ''})")
    sources = ", ".join(f"{n} from {s}" for s, n in sorted(summary.caption_sources.items()))
    lines.append(f"Captions: {sources or 'none'}; {summary.uncaptioned} files without a caption"
                 + (" (training skips them; add --captioner=MODEL_DIR)" if summary.uncaptioned else ""))
    if summary.unmatched_captions:
        lines.append(f"  {summary.unmatched_captions} captions name files that are not under --videos (see the log)")
    if summary.problems:
        lines.append(f"Every problem, one per line: {summary.report}")
    in_root = os.path.realpath(os.path.dirname(os.path.abspath(summary.manifest))) == os.path.realpath(videos)
    root = "" if in_root else f",root={videos}"
    lines.append(f"Train on it: python -m sora_jax.train --config=configs/tiny_videos.py:manifest={summary.manifest}"
                 f"{root} --workdir=DIR  (any config: --config.data.source=folder --config.data.manifest=...)")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when run as a program, because an import must not claim global
    flag names (--out is also sora_jax.encode's) in a process that imports both."""
    flags.DEFINE_string("videos", None, "Folder of videos and images (walked recursively).")
    flags.DEFINE_string("out", None, "Manifest to write (JSONL); `<out>.skipped.jsonl` and `<out>.log` go beside it.")
    flags.DEFINE_string("captions", "", "CSV (path,caption) or JSONL ({path, caption}); paths relative to --videos.")
    flags.DEFINE_string("captioner", "", "Local model directory of a captioner plug-in, for files without a caption.")
    flags.DEFINE_string("captioner_kind", "hf", "Plug-in reading --captioner (data_pipelines.captioners.CAPTIONERS).")
    flags.DEFINE_integer("caption_max_new_tokens", 32, "Longest generated caption, in tokens.")
    flags.DEFINE_string("caption_prompt", "", "Text the captioner continues ('a video of'); stripped from captions.")
    flags.DEFINE_string("caption_device", "cpu", "torch device for the 'hf' captioner (cpu, cuda, ...).")
    flags.DEFINE_bool("recaption", False, "Caption every file with --captioner, replacing given captions.")
    flags.DEFINE_integer("max_pixels", media.Limits().max_pixels, "Skip files with more pixels per frame (too_large).")
    flags.DEFINE_integer("max_frames", media.Limits().max_frames, "Skip files with more frames (too_large).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def _log_to_file(out: str) -> None:
    """Sends absl's log to `<out>.log` so per-file lines do not flood the console (unless asked for)."""
    if FLAGS.logtostderr or FLAGS.alsologtostderr:
        return
    handler = logging.get_absl_handler()
    if FLAGS.log_dir:
        handler.use_absl_log_file("prepare", FLAGS.log_dir)
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    handler.python_handler.stream = open(out + ".log", "a", encoding="utf-8")  # runs append, like absl


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    if not FLAGS.videos or not FLAGS.out:
        raise app.UsageError("--videos and --out are required.")
    if FLAGS.recaption and not FLAGS.captioner:
        raise app.UsageError("--recaption needs --captioner=MODEL_DIR.")
    if not os.path.isdir(FLAGS.videos):  # before a model load
        sys.exit(f"error: --videos={FLAGS.videos} is not a directory; give the folder that holds the media files.")
    if os.path.exists(FLAGS.out) and not FLAGS.overwrite:  # before the log file or a model load
        sys.exit(f"error: --out={FLAGS.out} already exists; pass --overwrite to replace it, or choose a new name.")
    _log_to_file(FLAGS.out)
    try:
        captioner = None
        if FLAGS.captioner:
            from data_pipelines.captioners import build_captioner
            print(f"Loading captioner {FLAGS.captioner} ...", file=sys.stderr)
            captioner = build_captioner(FLAGS.captioner_kind, FLAGS.captioner,
                                        max_new_tokens=FLAGS.caption_max_new_tokens,
                                        prompt=FLAGS.caption_prompt, device=FLAGS.caption_device)
        summary = prepare_manifest(
            FLAGS.videos, FLAGS.out, captions=FLAGS.captions, captioner=captioner, recaption=FLAGS.recaption,
            limits=media.Limits(max_pixels=FLAGS.max_pixels, max_frames=FLAGS.max_frames),
            overwrite=FLAGS.overwrite)
    except (ValueError, FileExistsError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    text = format_summary(summary, FLAGS.videos)
    logging.info("%s", text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
