#!/usr/bin/env bash
# The whole test suite, after an idempotent set-up (scripts/setup_env.sh).
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${RLHF_ENGINE_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
