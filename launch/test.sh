#!/usr/bin/env bash
# Quickstart (b): the test suite on CPU with 8 simulated devices (tests/conftest.py sets them).
EXTRAS=test source "$(dirname "$0")/env.sh"
python -m pytest -q tests "$@"
