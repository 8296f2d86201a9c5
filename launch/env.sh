# Sourced by the launch scripts: creates or reuses ./.venv and installs this package with EXTRAS.
# Re-installs only when setup.py changes (a stamp file records what was installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
EXTRAS=${EXTRAS:-}
stamp=".venv/.installed-$(sha1sum setup.py | cut -c1-12)-${EXTRAS:-base}"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
