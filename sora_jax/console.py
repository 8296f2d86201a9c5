"""What the command-line entry points print: our own messages on the terminal, library chatter in a log file.

Every entry point (train, sample, evaluate) calls, in order:

  1. `quiet_native_logs()` at import, before JAX or TensorFlow are imported: native (C++) start-up chatter
     is configured through environment variables read when those libraries load.
  2. `define_verbose_flag()` with its other flags.
  3. `setup_logging(log_file, verbose)` in main, once the flags say where the log goes: every Python log
     record (orbax, grain, jax, TensorFlow, absl, ours), INFO and up, is written to `log_file`. The terminal
     gets only WARNING and up from our own code (sora_jax/, data_pipelines/), one concise line each --
     or, with --verbose, every record in absl's format, as before.
  4. `reported_errors(...)` around the work: an exception ends as one "error: ..." paragraph naming the log
     file (which holds the traceback), exit status 1; --verbose prints the traceback on the terminal too.

absl's own --logtostderr / --alsologtostderr keep their meaning (everything to stderr), so scripts that
grep the full log stream still can.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Records whose call site lies in these directories are ours; everything else is a library's.
OUR_DIRS = tuple(os.path.join(os.path.dirname(_PACKAGE_DIR), d) + os.sep for d in ("sora_jax", "data_pipelines"))
# Lines a single call site may put on the terminal before the rest go to the log file only (e.g. one
# "skipped FILE" warning per unreadable file of a large folder).
MAX_LINES_PER_SITE = 5

# `extra=` for a log call whose caller also prints the line itself (e.g. checkpointing's fault reports): the
# log file gets it, the terminal only the caller's print.
FILE_ONLY = {"console": False}

_state: dict = {"handler": None, "stream": None, "log_file": None, "verbose": False}


def _argv_verbose(argv: list[str]) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def quiet_native_logs(argv: list[str] | None = None) -> None:
    """Sets environment variables that keep native libraries' start-up messages off the terminal.

    Must run before TensorFlow is imported (clu imports it for TensorBoard files). Only unset variables
    are set, and nothing is changed with --verbose. TensorFlow is only the event-file writer here, so
    turning its oneDNN kernels off (which is what prints "oneDNN custom operations are on" and absl's
    "All log messages before absl::InitializeLog()" twice at import) changes no numbers. JAX already sets
    TF_CPP_MIN_LOG_LEVEL=1 (native INFO off; warnings stay).
    """
    if _argv_verbose(sys.argv[1:] if argv is None else argv):
        return
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def define_verbose_flag() -> None:
    """Defines --verbose (once per process, whichever entry module asks first)."""
    from absl import flags
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Print library log messages (orbax, jax, ...) and tracebacks on the "
                          "terminal too; they always go to the log file.")


class _ConsoleHandler(logging.Handler):
    """Writes log records to stderr without breaking a tqdm progress bar (it is cleared and redrawn).

    Not verbose: only WARNING+ records from our own code, as "warning: message", at most
    MAX_LINES_PER_SITE per call site. Verbose: every record, in absl's format.
    """

    def __init__(self, verbose: bool, log_file: str):
        super().__init__(logging.DEBUG if verbose else logging.WARNING)
        self.verbose, self.log_file = verbose, log_file
        self.counts: dict[tuple[str, int], int] = {}
        if verbose:
            from absl import logging as absl_logging
            self.setFormatter(absl_logging.PythonFormatter())

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # already said on the terminal another way
            return False
        if self.verbose:
            return True
        if not record.pathname.startswith(OUR_DIRS):
            return False
        site = (record.pathname, record.lineno)
        self.counts[site] = self.counts.get(site, 0) + 1
        return self.counts[site] <= MAX_LINES_PER_SITE + 1

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        if self.counts.get((record.pathname, record.lineno)) == MAX_LINES_PER_SITE + 1:
            return f"warning: more messages like the last ones go to {self.log_file} only."
        return f"{record.levelname.lower()}: {record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            from tqdm import tqdm
            with tqdm.external_write_mode(file=sys.stderr):
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)


def _open_log(log_file: str, create_dir: bool):
    """The log file opened for appending; a temp-dir file of the same name if that place is not writable
    (e.g. sampling from a read-only work dir) or, without `create_dir`, does not exist."""
    try:
        folder = os.path.dirname(os.path.abspath(log_file))
        if create_dir:
            os.makedirs(folder, exist_ok=True)
        return log_file, open(log_file, "a", encoding="utf-8")
    except OSError:
        folder = os.path.join(tempfile.gettempdir(), f"sora_jax-{os.getuid()}")  # per user: no shared-file clash
        os.makedirs(folder, exist_ok=True)
        fallback = os.path.join(folder, os.path.basename(log_file))
        return fallback, open(fallback, "a", encoding="utf-8")


class _LogStream:
    """The log file's stream; with `deferred`, it holds what is written until commit() opens the file
    (see setup_logging(deferred)).

    Records that arrive once the file is closed are dropped rather than raising: at interpreter exit
    asyncio may report a task that the garbage collector reaches only after the file was finalized (a
    checkpoint write the OS refused, already reported), and logging would print a "Logging error" page
    under the command's one-line error.
    """

    def __init__(self, log_file: str, create_dir: bool, deferred: bool):
        self.log_file, self.create_dir, self.held, self.file = log_file, create_dir, [], None
        if not deferred:
            self.commit()

    def write(self, text: str) -> None:
        if self.file is None:
            self.held.append(text)
        elif not self.file.closed:
            self.file.write(text)

    def flush(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.flush()

    def commit(self) -> str:
        if self.file is None:
            self.log_file, self.file = _open_log(self.log_file, self.create_dir)
            self.file.write("".join(self.held))
            self.held = []
        return self.log_file

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def commit_log() -> None:
    """Starts writing a deferred log file (setup_logging(deferred=True)); a no-op otherwise.

    The trainer calls it once the config has been accepted and before it writes anything else, so a
    rejected command leaves the work dir byte-identical. An unexpected error commits it too (the log file
    then holds the traceback)."""
    stream = _state["stream"]
    if isinstance(stream, _LogStream):
        _state["log_file"] = stream.commit()


def setup_logging(log_file: str, verbose: bool = False, create_dir: bool = True, deferred: bool = False) -> str:
    """Routes Python logging to `log_file` (appending: a resumed run continues it) and our warnings to stderr.

    Call after absl has parsed the flags (inside main). Calling it again moves the log to another file
    (e.g. per-process names once the process index is known).

    Args:
      log_file: where every record at absl's --verbosity (INFO by default) goes.
      verbose: also print every record on the terminal (the --verbose flag).
      create_dir: create `log_file`'s directory if missing; if False, a missing one (a mistyped work dir
        that the command is about to report) gets a temp-dir log instead of a new empty directory.

      deferred: hold the records in memory until commit_log() (the trainer's: nothing is written to a work
        dir before its config is accepted); a second call keeps holding if the first one did.

    Returns:
      The path actually written (a temp-dir file when `log_file`'s directory is not writable).
    """
    from absl import flags, logging as absl_logging

    held = isinstance(_state["stream"], _LogStream) and _state["stream"].file is None
    stream = _LogStream(log_file, create_dir, deferred=deferred or held)
    if held:
        stream.held = _state["stream"].held
    log_file = stream.log_file  # a temp-dir file when that place is not writable
    handler = absl_logging.get_absl_handler()
    absl_logging.use_absl_handler()  # app.run installs it; a plain script calling this gets it too
    handler.python_handler.stream = stream
    if _state["stream"] is not None:
        _state["stream"].close()
    root = logging.getLogger()
    if _state["handler"] is not None:
        root.removeHandler(_state["handler"])
    FLAGS = flags.FLAGS
    absl_echoes = FLAGS.is_parsed() and (FLAGS["logtostderr"].value or FLAGS["alsologtostderr"].value)
    console = None if absl_echoes else _ConsoleHandler(verbose, log_file)
    if console is not None:
        root.addHandler(console)
    logging.captureWarnings(not verbose)  # Python warnings (deprecations, ...) are library chatter too
    _state.update(handler=console, stream=stream, log_file=log_file, verbose=verbose or bool(absl_echoes))
    return log_file


def log_file() -> str | None:
    """The file setup_logging last opened (None before it was called)."""
    return _state["log_file"]


def _paragraph(text: str, limit: int = 800) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def reported_errors(expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns an exception into "error: ..." on stderr and exit status 1 (130 for Ctrl-C).

    `expected` exceptions are the ones whose messages are written for the user (bad config, a checkpoint of
    another model, ...): their message is printed as it is. Anything else is unexpected: one paragraph with
    its type and message, and the traceback in the log file (on the terminal too with --verbose).
    """
    try:
        yield
    except expected as e:
        logging.error("%s", e, extra=FILE_ONLY)
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        logging.error("interrupted", exc_info=True, extra={"console": _state["verbose"]})
        commit_log()
        sys.stderr.write("error: interrupted (Ctrl-C).\n")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 -- the point: no bare traceback for a user
        logging.exception("stopped by an unexpected error", extra={"console": _state["verbose"]})
        commit_log()
        where = f"The traceback is in {log_file()}" if log_file() else "No log file was set up"
        hint = "" if _state["verbose"] else "; --verbose prints it on the terminal"
        sys.exit(f"error: {type(e).__name__}: {_paragraph(e)} ({where}{hint}.)")
