#!/usr/bin/env bash
# One entry point that sets everything up from a fresh clone, then runs a job:
#   ./run.sh bench   benchmarks + numerics check on the device present (CPU here)
#   ./run.sh test    the test suite
# Set-up: a virtualenv in .venv (override with VENV=...), the pinned dependencies of
# requirements.txt (torch 2.14.1), and the C++ (and, with a CUDA toolkit, CUDA) extension.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[setup] creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
echo "[setup] installing pinned dependencies (requirements.txt)"
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch" # fail loudly if the install did not work
if ! "$PY" -m pip show -q convmixer-kernels >/dev/null 2>&1; then
  echo "[setup] installing convmixer_kernels (editable; builds the extension)"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
else
  echo "[setup] rebuilding the extension (incremental)"
  "$PY" setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(WARNING|warning: build_ext|running)" || true
fi
"$PY" -c "import convmixer_kernels._C"

job=${1:-}
shift || true
case "$job" in
  test)
    exec "$PY" -m pytest -q -ra tests "$@"
    ;;
  bench)
    exec "$PY" -m convmixer_kernels bench "$@"
    ;;
  *)
    echo "usage: ./run.sh {bench|test} [args...]" >&2
    exit 2
    ;;
esac
