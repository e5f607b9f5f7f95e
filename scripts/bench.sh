#!/usr/bin/env bash
# Every benchmark in benchmarks/ (pytest-benchmark), after an idempotent
# set-up (scripts/setup_env.sh). Results go to benchmarks/results/<machine>/
# or $RLHF_ENGINE_BENCH_OUT: results.json, results.md, results.png.
# Extra arguments go to pytest (e.g. -k "bfloat16 and fwd_bwd").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PY="${RLHF_ENGINE_VENV:-$ROOT/.venv}/bin/python"
# benchmarks/conftest.py collects bench_*.py; `pytest tests` never loads it.
"$PY" -m pytest benchmarks -q -p no:cacheprovider -W ignore::DeprecationWarning \
  --benchmark-columns=min,median,max,rounds --benchmark-sort=name "$@"
