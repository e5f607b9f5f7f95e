#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment (.venv, or
# $RLHF_ENGINE_VENV) with the pinned dev dependencies, and rlhf_engine
# installed in editable mode with its native code built. Each step is skipped
# when its inputs have not changed since it last ran. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLHF_ENGINE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

deps_stamp=$(stamp_of "$ROOT/requirements-dev.txt")
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$deps_stamp" ]; then
  echo "[setup] installing pinned dev dependencies (requirements-dev.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt"
  echo "$deps_stamp" > "$VENV/.deps-stamp"
fi

native_sources=$(cd "$ROOT" && find setup.py pyproject.toml csrc -type f | sort)
build_stamp=$(cd "$ROOT" && stamp_of $native_sources)
if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$build_stamp" ] || \
   ! ls "$ROOT"/rlhf_engine/_C*.so >/dev/null 2>&1; then
  echo "[setup] building rlhf_engine (C++ CPU kernels; CUDA kernels when nvcc is found)"
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$build_stamp" > "$VENV/.build-stamp"
fi
