#!/usr/bin/env bash
# The project's main job for now: every backend of the ops on the built-in
# sizes, with error against float64, time and peak memory, after an
# idempotent set-up (scripts/setup_env.sh). Extra arguments go to the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${RLHF_ENGINE_VENV:-$ROOT/.venv}/bin/python" -m rlhf_engine.demo "$@"
