"""What a person sees: a progress bar and our own lines on the terminal, library chatter in WORKDIR/train.log,
--verbose bringing it back, and an error as one "error:" paragraph rather than a traceback."""
import logging
import os
import re
import subprocess
import sys

import pytest

from sora_jax import console
from tests.conftest import ROOT

# absl's line prefix, e.g. "I1123 13:04:15.660613 140042798566272 checkpoint_manager.py:701]".
ABSL_LINE = re.compile(r"(^|[\r\n])[IWE]\d{4} \d\d:\d\d:\d\d")


def _train(workdir, *flags):
    return subprocess.run([sys.executable, "-m", "sora_jax.train", f"--workdir={workdir}", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("console"))
    return workdir, _train(workdir, "--config=configs/tiny.py:smoke", "--config.sample.num_prompts=0")


def test_training_console_shows_progress_and_evaluations_not_library_chatter(quiet_run):
    workdir, r = quiet_run
    terminal = r.stdout + r.stderr
    assert r.returncode == 0, terminal[-3000:]
    assert not ABSL_LINE.search(terminal), terminal[-3000:]
    for chatter in ("checkpoint_manager", "orbax", "oneDNN", "absl::InitializeLog", "Traceback"):
        assert chatter not in terminal, chatter
    # The bar's final state on stderr: all steps, the last window's loss and throughput, the last save.
    final_bar = r.stderr.split("\r")[-1]
    assert re.search(r"train: 100%.*\| 4/4 \[.*loss=[\d.]+, tokens/s=[\d.]+k?, saved=4\]", final_bar), r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("eval step")] == ["eval step 0", "eval step 4"]
    assert any(line.startswith("val_loss_ema: ") for line in lines)
    assert f"Log: {os.path.join(workdir, 'train.log')}" in r.stdout
    log = open(os.path.join(workdir, "train.log")).read()
    assert "checkpoint_manager.py" in log and "] grad_norm=" in log  # the library lines and the metrics went here


def test_verbose_prints_the_library_log_too(quiet_run):
    workdir, _ = quiet_run  # already trained: the rerun only opens the checkpoints, which orbax logs
    before = os.path.getsize(os.path.join(workdir, "train.log"))
    r = _train(workdir, "--config=configs/tiny.py:smoke", "--config.sample.num_prompts=0", "--verbose")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to train" in r.stdout
    assert ABSL_LINE.search(r.stderr) and "checkpoint_manager.py" in r.stderr
    assert os.path.getsize(os.path.join(workdir, "train.log")) > before  # the file gets it as well


def test_an_unexpected_error_is_one_paragraph_with_the_traceback_in_the_log(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "a.mp4", "caption": "a red circle"}\nnot json\n')
    workdir = tmp_path / "w"
    r = _train(workdir, f"--config=configs/tiny_videos.py:manifest={manifest},smoke")
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr and not ABSL_LINE.search(r.stderr), r.stderr
    message = r.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: ") and "line 2 is not valid JSON" in message[0]
    log = open(workdir / "train.log").read()
    assert "line 2 is not valid JSON" in log
    if "ValueError" in message[0]:  # unexpected (not one of the trainer's own error types): traceback logged
        assert "Traceback" in log and f"The traceback is in {workdir / 'train.log'}" in message[0]


def test_reported_errors_paragraph_and_expected_errors():
    with pytest.raises(SystemExit) as exit_:
        with console.reported_errors((KeyError,)):
            raise RuntimeError("first line\n   second line")
    assert str(exit_.value.code).startswith("error: RuntimeError: first line second line (")
    with pytest.raises(SystemExit) as exit_:
        with console.reported_errors((LookupError,)):
            raise KeyError("no such field")
    assert exit_.value.code == "error: 'no such field'"  # an expected error's message, as it is


def test_console_lines_are_ours_concise_and_limited(capsys):
    handler = console._ConsoleHandler(verbose=False, log_file="/w/train.log")
    ours = os.path.join(ROOT, "data_pipelines", "sources.py")
    library = os.path.join(os.path.dirname(logging.__file__), "somewhere.py")

    def record(path, level, message, line=10):
        return logging.LogRecord("x", level, path, line, message, (), None)
    for i in range(console.MAX_LINES_PER_SITE + 3):
        handler.handle(record(ours, logging.WARNING, f"skipped file{i}.mp4 (corrupt)"))
    handler.handle(record(library, logging.WARNING, "a library warning"))
    handler.handle(record(ours, logging.ERROR, "another site", line=20))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ([f"warning: skipped file{i}.mp4 (corrupt)" for i in range(console.MAX_LINES_PER_SITE)]
                     + ["warning: more messages like the last ones go to /w/train.log only.",
                        "error: another site"])


_LATE_RECORD = """
import logging, sys
from absl import flags
from sora_jax import console
flags.FLAGS(["x"])
console.setup_logging(sys.argv[1], deferred=sys.argv[2] == "deferred")
console.commit_log()
logging.warning("before")
console._state["stream"].file.close()  # as at interpreter exit, before a late task is collected
logging.getLogger("asyncio").error("Task exception was never retrieved")
print("done")
"""


@pytest.mark.parametrize("mode", ["deferred", "direct"])
def test_a_record_after_the_log_file_closed_prints_no_logging_error(tmp_path, mode):
    log = str(tmp_path / "train.log")
    r = subprocess.run([sys.executable, "-c", _LATE_RECORD, log, mode], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
    assert "Logging error" not in r.stderr and "closed file" not in r.stderr, r.stderr[-2000:]
    assert "before" in open(log).read()
