#!/usr/bin/env bash
# Quickstart (b): the linter, then the test suite on CPU with 8 simulated devices (tests/conftest.py sets them).
# Fails on any lint error (ruff.toml), failed test, or skipped test not marked gpu/tpu (tests/conftest.py);
# -rs lists every skip with its reason.
EXTRAS=test source "$(dirname "$0")/env.sh"
ruff check .
python -m pytest -q -rs --durations=15 tests "$@"
