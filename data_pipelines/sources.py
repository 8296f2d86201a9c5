"""Random-access sources of real media for grain, the transform that decodes them, and source mixtures.

A source returns undecoded RECORDS, cheap to make and to pickle into grain workers:

    {"index": int, "name": str, "caption": str | None, "caption_error": "missing_caption" | "bad_caption" | None,
     and exactly one of "path": str (absolute) | "media": bytes (an encoded file) | "frames": uint8 array}

``name`` identifies the record in log lines (a file path, or a record id). ``DecodeMedia`` turns records
into training examples and skips bad ones: a skipped record becomes None (grain drops it) and is counted
in the per-process ``SKIPS`` tally, which the pipeline drains into every batch. Bad files never stop a
run; a source with no readable file at all does (``NoReadableExamples``).

Sources:
  ManifestSource   a JSONL or CSV manifest of (path, caption) under a root folder
  ClipRecordSource ArrayRecord shards of encoded clips (``write_clip_records`` makes them from a manifest)
  TfdsSource       an array_record-format TFDS dataset read with ``tfds.data_source``
"""
from __future__ import annotations

import collections
import csv
import glob
import json
import logging
import math
import os
import threading

import grain
import grain.experimental as grain_exp
import numpy as np
from flax import serialization

from data_pipelines import media

_LOG = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CSV_SUFFIXES = (".csv",)


def pixel_source(data_cfg) -> str:
    """The source of the pixels a model trains on: config.data.raw_source when it trains on pre-encoded latents
    (source "latents"), otherwise config.data.source."""
    return data_cfg.get("raw_source", "procedural") if data_cfg.source == "latents" else data_cfg.source


def _record(index: int, name: str, caption, caption_error, **content) -> dict:
    if caption_error is None and (not isinstance(caption, str) or not caption.strip()):
        caption_error = "missing_caption"
    return {"index": index, "name": name, "caption": caption, "caption_error": caption_error, **content}


# ----------------------------------------------------------------------------------------------- manifests


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _decode_lines(raw: bytes) -> tuple[list[str], set[int]]:
    """Physical lines (newlines kept) decoded as UTF-8, and the 1-based numbers of lines that were not UTF-8.

    Decoding line by line confines a stray byte (a Latin-1 caption pasted into the manifest) to its own
    record instead of failing the whole file.
    """
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as spreadsheet exports write
        raw = raw[3:]
    lines, bad = [], set()
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.add(number)
    return lines, bad


def _jsonl_rows(manifest: str, lines: list[str], bad: set[int]):
    """(line number, path, caption, not_utf8) per non-blank JSONL line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest} line {number} is not valid JSON ({e}); every line must be one object "
                             'like {"path": "videos/a.mp4", "caption": "..."}.') from e
        if not isinstance(row, dict) or "path" not in row:
            raise ValueError(f"{manifest} line {number} has no \"path\" key; every line must be one object "
                             'like {"path": "videos/a.mp4", "caption": "..."}.')
        yield number, row["path"], row.get("caption"), number in bad


def _csv_rows(manifest: str, lines: list[str], bad: set[int]):
    """(line number, path, caption, not_utf8) per CSV row; a quoted caption may span several lines."""
    reader = csv.reader(lines)
    header = next(reader, None)
    columns = [c.strip().lower() for c in header or []]
    for needed in ("path", "caption"):
        if needed not in columns:
            raise ValueError(f"{manifest}: the CSV header {header} has no {needed!r} column; the first line must "
                             "name the columns, e.g. `path,caption`.")
    ip, ic = columns.index("path"), columns.index("caption")
    first = reader.line_num + 1
    for row in reader:
        span = range(first, reader.line_num + 1)
        first = reader.line_num + 1
        if not row or not any(cell.strip() for cell in row):
            continue
        path = row[ip] if ip < len(row) else ""
        caption = row[ic] if ic < len(row) else None
        yield span.start, path, caption, any(n in bad for n in span)


class ManifestSource:
    """Media files listed in a manifest: JSONL ({"path", "caption"} per line) or CSV (header path,caption).

    Parameters
    ----------
    manifest : str
        The manifest file. ``.csv`` is read as CSV, ``.jsonl``/``.json``/``.ndjson`` as JSONL; any other
        name as JSONL when its first non-blank line starts with ``{``, else CSV. Extra keys/columns are
        ignored.
    root : str
        Folder that relative paths are relative to and that every file must lie in; default the
        manifest's folder.

    Raises
    ------
    ValueError
        The manifest is empty, malformed, or lists a path that escapes ``root`` (``..``, an absolute path
        elsewhere, or a symlink resolving outside it): training data may only come from where it was put.

    Notes
    -----
    A line that is not valid UTF-8 yields a record with ``caption_error="bad_caption"`` (its path read
    with replacement characters, for the log line); an empty or missing caption gives
    ``"missing_caption"``. Files are not opened here: missing or unreadable files are skipped later.
    """

    def __init__(self, manifest: str, root: str = ""):
        manifest = os.fspath(manifest)
        self.manifest = manifest
        self.root = os.path.abspath(root or os.path.dirname(os.path.abspath(manifest)))
        try:
            with open(manifest, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the manifest {manifest} ({e}); check config.data.manifest.") from e
        lines, bad = _decode_lines(raw)
        first = next((line for line in lines if line.strip()), "")
        suffix = os.path.splitext(manifest)[1].lower()
        is_csv = suffix in _CSV_SUFFIXES or (suffix not in _JSONL_SUFFIXES and not first.lstrip().startswith("{"))
        rows = _csv_rows(manifest, lines, bad) if is_csv else _jsonl_rows(manifest, lines, bad)
        real_root = os.path.realpath(self.root)
        self._paths, self._captions, self._errors = [], [], []
        for number, path, caption, not_utf8 in rows:
            self._paths.append(self._resolve(path, number, real_root))
            self._captions.append(caption if isinstance(caption, str) else None)
            if not_utf8 or (caption is not None and not isinstance(caption, str)):
                self._errors.append("bad_caption")
            else:
                self._errors.append(None)
        if not self._paths:
            raise ValueError(f"the manifest {manifest} lists no files; write one with `python -m "
                             "data_pipelines.prepare --videos=DIR --out=DIR/manifest.jsonl`.")

    def _resolve(self, path, number: int, real_root: str) -> str:
        where = f"{self.manifest} line {number}"
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where} has an empty path; give each file's path relative to {self.root}.")
        full = os.path.normpath(os.path.join(self.root, path))  # join keeps an absolute `path` as is
        fix = (f"keep the media under the root {self.root} (or set config.data.root to a folder containing it) "
               "and list it by a path inside it")
        if not (_within(full, self.root) or _within(full, real_root)):
            raise ValueError(f"{where}: the path {path!r} lies outside the root {self.root}; {fix}.")
        real = os.path.realpath(full)
        if not _within(real, real_root):
            raise ValueError(f"{where}: {path!r} is a symlink (or lies under one) resolving to {real}, outside "
                             f"the root {real_root}; {fix}, copying the file instead of linking it.")
        return full

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        path = self._paths[index]
        return _record(index, path, self._captions[index], self._errors[index], path=path)

    def __repr__(self) -> str:
        return f"ManifestSource({self.manifest!r}, root={self.root!r}, {len(self)} files)"


# -------------------------------------------------------------------------------------------- ArrayRecord


class ClipRecordSource:
    """Encoded clips stored in ArrayRecord shards (written by :func:`write_clip_records`).

    Parameters
    ----------
    pattern : str
        Glob of the shard files, e.g. ``/data/clips/clips-*.array_record``; shards are read in sorted order.

    Notes
    -----
    Each stored record is a flax msgpack of {"media": bytes, "caption": str, "name": str}. A stored
    record that does not unpack gives a record with ``error="corrupt"`` (and empty media), which
    ``DecodeMedia`` skips and counts.
    """

    def __init__(self, pattern: str):
        self.pattern = os.fspath(pattern)
        self.paths = sorted(glob.glob(self.pattern))
        if not self.paths:
            raise ValueError(f"no ArrayRecord shards match {self.pattern!r}; check config.data.records (write "
                             "shards with data_pipelines.sources.write_clip_records).")
        self._reader = None
        self._length = len(self._open())

    def _open(self):
        if self._reader is None:
            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        return self._reader

    def __getstate__(self):
        # Readers hold open files; each grain worker process opens its own.
        return dict(self.__dict__, _reader=None)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        raw = self._open()[index]
        try:
            stored = serialization.msgpack_restore(raw)
            content, caption, name = bytes(stored["media"]), stored.get("caption"), str(stored["name"])
        except Exception as e:  # damaged bytes raise several msgpack / key / type errors
            name = f"{self.pattern}[{index}]"
            return _record(index, name, "", None, media=b"", error=f"the stored record does not unpack ({e})")
        return _record(index, name, caption, None, media=content)

    def __repr__(self) -> str:
        return f"ClipRecordSource({self.pattern!r}, {len(self.paths)} shards, {len(self)} clips)"


def write_clip_records(source: ManifestSource, out_dir: str, num_shards: int) -> list[str]:
    """Copies the encoded files of a manifest into ArrayRecord shards, one record per file.

    Parameters
    ----------
    source : ManifestSource
        The files to store (any source of "path" or "media" records works). Records with a caption
        error and files that cannot be read are left out, with a warning.
    out_dir : str
        Folder for ``clips-{k:05d}-of-{n:05d}.array_record`` (created if missing).
    num_shards : int
        Number of shards, reduced to the number of records when there are fewer; records are split
        into contiguous runs, so reading the shards in order keeps the manifest's order.

    Returns
    -------
    list of str
        The shard paths, in order.
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # only the writer needs it

    if num_shards < 1:
        raise ValueError(f"write_clip_records needs num_shards >= 1, got {num_shards}.")
    keep = []
    for i in range(len(source)):
        record = source[i]
        if record["caption_error"]:
            _LOG.warning("write_clip_records: leaving out %s (%s).", record["name"], record["caption_error"])
        else:
            keep.append(i)
    if not keep:
        raise ValueError(f"write_clip_records: none of the {len(source)} records of {source!r} has a caption.")
    n = min(num_shards, len(keep))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(n):
        path = os.path.join(out_dir, f"clips-{k:05d}-of-{n:05d}.array_record")
        # group_size:1 keeps every record independently readable: random access reads one clip, not a group.
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for i in keep[k * len(keep) // n:(k + 1) * len(keep) // n]:
                record = source[i]
                try:
                    content = record["media"] if "media" in record else _read_bytes(record["path"])
                except OSError as e:
                    _LOG.warning("write_clip_records: leaving out %s: cannot read it (%s).", record["name"], e)
                    continue
                writer.write(serialization.msgpack_serialize(
                    {"media": content, "caption": record["caption"], "name": record["name"]}))
        finally:
            writer.close()
        paths.append(path)
    return paths


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------- TFDS


def _as_frames(value) -> np.ndarray:
    """A TFDS video/image value as uint8 (T, H, W, 3): lists of frames stacked, gray/alpha made RGB."""
    frames = np.asarray(np.stack(value) if isinstance(value, (list, tuple)) else value)
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {frames.dtype}")
    if frames.ndim == 2 or (frames.ndim == 3 and frames.shape[-1] not in (1, 3, 4)):
        frames = frames[..., None]  # (H, W) image or (T, H, W) gray video
    if frames.ndim == 3:
        frames = frames[None]  # one image is a one-frame video
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or 0 in frames.shape:
        raise ValueError(f"expected (T, H, W, C) or (H, W, C) pixels, got shape {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


class TfdsSource:
    """One split of an array_record-format TFDS dataset, read with ``tfds.data_source`` (random access).

    Parameters
    ----------
    name : str
        Registered dataset name, or the name of a prepared dataset under ``data_dir`` (optionally
        ``name:version``).
    split : str
        TFDS split, e.g. "train" or "train[:90%]".
    data_dir : str
        TFDS data folder; "" uses TFDS's default (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
    video_key, caption_key : str
        Feature names of the pixels and the caption.

    Notes
    -----
    The video feature may be ``tfds.features.Video`` (decoded by TFDS to frames; it needs FFmpeg only
    when the dataset was built from video files), ``tfds.features.Image``, a uint8 ``Tensor`` of shape
    (T, H, W, C) or (H, W, C) (records carry "frames", C of 1 or 4 made RGB), or an encoded file as a
    string ``Tensor`` (records carry "media", decoded like a file). A scalar ``fps`` feature, when the
    dataset has one, is passed on so that clips are resampled to config.data.fps; without it frames are
    kept at their stored rate and the sample's fps is recorded as unknown (0). Nothing is downloaded:
    the dataset must already be prepared in array_record format.
    """

    def __init__(self, name: str, split: str, data_dir: str = "", video_key: str = "video",
                 caption_key: str = "caption"):
        self.name, self.split, self.data_dir = name, split, os.fspath(data_dir or "")
        self.video_key, self.caption_key = video_key, caption_key
        self._source = None
        self._length = len(self._open())
        features = list(self._open().dataset_info.features.keys())
        for field, key in (("tfds_video_key", video_key), ("tfds_caption_key", caption_key)):
            if key not in features:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} (features: {features}); set "
                                 f"config.data.{field}.")

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # heavy; only TFDS users pay for it

            try:
                self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir or None,
                                                download=False, try_gcs=False)
            except Exception as e:
                raise ValueError(
                    f"cannot open TFDS dataset {self.name!r} split {self.split!r} under "
                    f"{self.data_dir or 'the default data dir'} ({e}); prepare it first with "
                    "builder.download_and_prepare(file_format='array_record') and check config.data.tfds_name, "
                    "tfds_split and tfds_data_dir.") from e
        return self._source

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        example = self._open()[index]
        name = f"tfds:{self.name}/{self.split}[{index}]"
        caption, error = example[self.caption_key], None
        if isinstance(caption, (bytes, np.bytes_)):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError:
                caption, error = bytes(caption).decode("utf-8", errors="replace"), "bad_caption"
        elif not isinstance(caption, str):
            caption, error = None, "bad_caption"
        video = example[self.video_key]
        if isinstance(video, (bytes, np.bytes_)):
            record = _record(index, name, caption, error, media=bytes(video))
        else:
            try:
                record = _record(index, name, caption, error, frames=_as_frames(video))
            except ValueError as e:
                record = _record(index, name, caption, error, frames=np.zeros((0, 0, 0, 3), np.uint8),
                                 error=f"feature {self.video_key!r}: {e}")
        if "fps" in example and np.ndim(example["fps"]) == 0:
            record["fps"] = float(example["fps"])
        return record

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} examples)"


# ---------------------------------------------------------------------------------------- skip accounting


class SkipTally:
    """Thread-safe per-process count of skipped records by reason (``media.SKIP_REASONS``).

    The first skip of each file in this process is logged as one warning naming the file and the
    reason; repeats (the same bad file in a later epoch) are logged at debug level only, but counted.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._since_drain = collections.Counter()
        self._totals = collections.Counter()
        self._warned = set()

    def record(self, reason: str, name: str, detail: str = "") -> None:
        """Counts one skipped record and logs it.

        Parameters
        ----------
        reason : str
            One of ``media.SKIP_REASONS``.
        name : str
            The file or record id, for the log line.
        detail : str
            What is wrong and how to fix it.
        """
        if reason not in media.SKIP_REASONS:
            raise ValueError(f"skip reason {reason!r} is not one of {media.SKIP_REASONS}.")
        with self._lock:
            self._since_drain[reason] += 1
            self._totals[reason] += 1
            first = name not in self._warned
            self._warned.add(name)
        level = logging.WARNING if first else logging.DEBUG
        _LOG.log(level, "skipped %s (%s)%s", name, reason, f": {detail}" if detail else "")

    def drain(self) -> dict[str, int]:
        """Counts by reason since the previous drain (reasons with no skips are left out); resets them."""
        with self._lock:
            counts, self._since_drain = dict(self._since_drain), collections.Counter()
        return counts

    def totals(self) -> dict[str, int]:
        """Cumulative counts by reason in this process."""
        with self._lock:
            return dict(self._totals)


SKIPS = SkipTally()


# ------------------------------------------------------------------------------------------------ decoding


class NoReadableExamples(ValueError):
    """A source none of whose records could be used."""


def _rule_count(n: int, rule: int) -> int:
    """Largest T <= n with (T - 1) % rule == 0 (0 when n < 1)."""
    return 0 if n < 1 else 1 + ((n - 1) // rule) * rule


def _describe(data_cfg) -> str:
    source = data_cfg.get("source", "")
    where = {"folder": data_cfg.get("manifest", ""), "records": data_cfg.get("records", ""),
             "tfds": f"{data_cfg.get('tfds_name', '')}/{data_cfg.get('tfds_split', '')}"}.get(source, "")
    return f"config.data.source={source!r} ({where})" if where else f"config.data.source={source!r}"


class DecodeMedia(grain.transforms.RandomMap):
    """Decodes a record into a training clip sized for a token budget; skips and counts bad records.

    Parameters
    ----------
    data_cfg : ml_collections.ConfigDict
        config.data; reads fps, clip_frames, max_sample_tokens, crop, max_pixels, max_frames.
    temporal_stride : int
        Frames per latent frame (autoencoder temporal stride times temporal patch): clip lengths are
        1 + k * temporal_stride.
    multiple : int
        Pixels per token side (autoencoder spatial stride times spatial patch): sides are multiples of it.
    source_size : int
        Length of the source; after that many consecutive skips in this process with no success ever,
        the source is declared unreadable.
    name : str
        The source, for error messages; default described from data_cfg.

    Notes
    -----
    Size rule: tokens = latent_frames * (h / multiple) * (w / multiple) <= data_cfg.max_sample_tokens, with
    latent_frames = 1 + (T - 1) // temporal_stride. T comes first: the longest clip up to clip_frames that
    leaves room for at least one multiple x multiple frame; then the largest size of the native aspect
    ratio within the remaining per-frame budget (``media.fit_size``, never upscaled). Output:
    {"video": float32 (T, h, w, 3) in [-1, 1], "caption", "index",
     "meta": float32 (fps, original height, original width, clip duration T / fps)}; fps (and the
    duration) are 0 for images and for frames of unknown rate.
    """

    def __init__(self, data_cfg, temporal_stride: int, multiple: int, source_size: int, name: str = ""):
        self.fps = float(data_cfg.get("fps", 8.0))
        self.clip_frames = int(data_cfg.get("clip_frames", 9))
        self.budget = int(data_cfg.get("max_sample_tokens", 256))
        self.crop = bool(data_cfg.get("crop", False))
        self.limits = media.Limits(int(data_cfg.get("max_pixels", 4096 * 4096)),
                                   int(data_cfg.get("max_frames", 100_000)))
        self.temporal_stride, self.multiple = int(temporal_stride), int(multiple)
        self.source_size, self.name = int(source_size), name or _describe(data_cfg)
        for field, value in (("clip_frames", self.clip_frames), ("max_sample_tokens", self.budget),
                             ("temporal_stride", self.temporal_stride), ("multiple", self.multiple)):
            if value < 1:
                raise ValueError(f"DecodeMedia: {field}={value} must be >= 1 (config.data.{field}).")
        # The longest clip whose latent frames leave at least one token each.
        self.max_clip = _rule_count(min(self.clip_frames, 1 + (self.budget - 1) * self.temporal_stride),
                                    self.temporal_stride)
        self._init_state()

    def _init_state(self):
        self._lock = threading.Lock()
        self._run, self._ok, self._reasons = 0, False, collections.Counter()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The (h, w) a clip of `frames` frames and native size height x width is resized to."""
        latent_frames = 1 + (frames - 1) // self.temporal_stride
        per_frame = max(1, self.budget // latent_frames)
        return media.fit_size(height, width, per_frame * self.multiple ** 2, self.multiple)

    def _clip(self, record: dict, rng: np.random.Generator) -> tuple[np.ndarray, float, int, int]:
        """(uint8 frames, fps, native height, native width) of a random clip of the record."""
        if "frames" not in record:
            src = record["path"] if "path" in record else record["media"]
            frames, meta = media.decode(src, fps=self.fps, max_frames=self.max_clip,
                                        frame_stride_rule=self.temporal_stride, rng=rng, limits=self.limits)
            return frames, float(meta["fps"]), int(meta["orig_height"]), int(meta["orig_width"])
        frames, native = record["frames"], float(record.get("fps", 0.0))
        if len(frames) == 0:
            raise media.BadMedia("empty", f"{record['name']} holds no frames.")
        stride = media.frame_stride(native, self.fps) if native > 0 else 1
        count = _rule_count(min(self.max_clip, (len(frames) - 1) // stride + 1), self.temporal_stride)
        first = int(rng.integers(0, len(frames) - (count - 1) * stride))
        return frames[first:first + (count - 1) * stride + 1:stride], native / stride, *frames.shape[1:3]

    def _caption(self, record: dict) -> str:
        error, name = record.get("caption_error"), record["name"]
        if error == "bad_caption":
            raise media.BadMedia(error, f"{name}: the caption is not valid UTF-8 text; re-save the manifest (or "
                                        "dataset) as UTF-8.")
        if error or not isinstance(record.get("caption"), str) or not record["caption"].strip():
            raise media.BadMedia("missing_caption", f"{name} has no caption; add one (python -m "
                                                    "data_pipelines.prepare --captions=... or --captioner=...).")
        return record["caption"]

    def random_map(self, record: dict, rng: np.random.Generator) -> dict | None:
        """The decoded, resized clip of `record`, or None (counted in SKIPS) when the record is unusable."""
        try:
            if record.get("error"):  # the source could not even unpack the record
                raise media.BadMedia("corrupt", f"{record['name']}: {record['error']}.")
            caption = self._caption(record)
            frames, fps, height, width = self._clip(record, rng)
        except media.BadMedia as e:
            SKIPS.record(e.reason, record["name"], str(e))
            self._count(e.reason)
            return None
        h, w = self.target_size(len(frames), height, width)
        video = media.resize(frames, h, w, crop=self.crop).astype(np.float32) / 127.5 - 1.0
        self._count(None)
        duration = len(frames) / fps if fps > 0 else 0.0
        return {"video": video, "caption": caption, "index": int(record["index"]),
                "meta": np.asarray([fps, height, width, duration], np.float32)}

    def _count(self, reason: str | None) -> None:
        with self._lock:
            if reason is None:
                self._ok, self._run = True, 0
                return
            self._run += 1
            self._reasons[reason] += 1
            hopeless = not self._ok and self._run >= self.source_size > 0
            reasons = dict(self._reasons)
        if hopeless:
            raise NoReadableExamples(
                f"{self.name}: all {self._run} records read in this process were skipped and none could be used "
                f"(reasons: {reasons}); check the log lines above naming each file, and the manifest's paths "
                "and captions.")


# ------------------------------------------------------------------------------------------------ mixtures


class _WindowShuffle(grain.transforms.DatasetSelectionMap):
    """Permutes positions within consecutive windows (the last one may be partial) of a dataset."""

    # grain's index_shuffle cycle-walks over a large minimum block: ~10 ms a call for a window of 2, 15 us
    # for 1000. Small windows draw the whole permutation instead (microseconds).
    _SMALL = 1024

    def __init__(self, length: int, window: int, seed: int):
        self._length, self._window, self._seed = length, window, seed

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        block, offset = divmod(index, self._window)
        start = block * self._window
        size = min(self._window, self._length - start)
        if size <= self._SMALL:
            return 0, start + int(np.random.default_rng([self._seed, block]).permutation(size)[offset])
        seed = (self._seed * 1_000_003 + block) % 2**32
        return 0, start + grain_exp.index_shuffle(offset, max_index=size - 1, seed=seed, rounds=4)


def mixture(datasets: list[grain.MapDataset], weights: list[float], seed: int = 0) -> grain.MapDataset:
    """Mixes datasets in the proportions of `weights`, deterministically.

    Parameters
    ----------
    datasets : list of grain.MapDataset
        The components; repeat them first for an endless mixture.
    weights : list of float
        Positive relative weights (normalised here).
    seed : int
        Seed of the order within each period of the mixture.

    Returns
    -------
    grain.MapDataset
        Element k comes from component i with share weights[i] / sum(weights).

    Notes
    -----
    ``grain.MapDataset.mix`` interleaves in a fixed pattern: it scales the smallest weight to 100,
    truncates the others to integers, and every run of sum(scaled) positions holds each component exactly
    that many times, each component's elements taken in order (0, 1, 2, ...). Its length is
    min(len_i / share_i): it ends when the first component runs out, so finite components give a finite
    mixture in which the others are partly unread; components of infinite length (``.repeat()``) give an
    infinite one. The pattern is strictly periodic, so a strided read -- host p of P reading positions
    p, p + P, ... -- can see a biased share: weights (1, 1) alternate, and with 2 hosts each host would
    read a single component. Positions are therefore permuted within each period (seeded, stateless), which
    keeps the exact shares per period and gives every stride the right share on average.

    The shares are of records drawn: when components are decoded before mixing (as the pipeline does),
    records a component skips as bad are dropped after the draw, lowering that component's share of
    examples by its skip rate (counted in SKIPS).
    """
    if len(datasets) != len(weights) or not datasets:
        raise ValueError(f"mixture needs one weight per dataset, got {len(datasets)} datasets and {len(weights)} "
                         "weights (config.data.mixture).")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive numbers, got {list(weights)} (config.data.mixture).")
    if len(datasets) == 1:
        return datasets[0]
    mixed = grain.MapDataset.mix(list(datasets), [float(w) for w in weights])
    # The period of grain's interleaving, from the integer proportions it derives (see Notes).
    scale = 100 / min(weights)
    scaled = [int(w * scale) for w in weights]
    window = sum(scaled) // math.gcd(*scaled)
    length = len(mixed)
    if length < 2:
        return mixed
    return grain.MapDataset.select_from_datasets([mixed], _WindowShuffle(length, window, seed))
