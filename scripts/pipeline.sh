#!/usr/bin/env bash
# The main job: set up (idempotent, scripts/setup_env.sh), then run the
# built-in InstructGPT pipeline (SFT -> reward model -> PPO -> evaluation ->
# report). Arguments go to `rlhf-engine pipeline` (e.g. --out runs/demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${RLHF_ENGINE_VENV:-$ROOT/.venv}/bin/python" -m rlhf_engine.cli pipeline "$@"
