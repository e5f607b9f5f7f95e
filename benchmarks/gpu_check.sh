#!/usr/bin/env bash
# One prepared check for a lent GPU machine (system python3 with torch, triton,
# pytest, pytest-benchmark, matplotlib, pybind11, ninja; no network):
#   bash benchmarks/gpu_check.sh <outdir>
# Writes into <outdir>: nvidia-smi.txt, versions.txt, build.log, tests.log
# (+ junit-*.xml), bench.log and the benchmark results (results.{json,md,png}),
# steps.log (rc and seconds of each step). Every step has a timeout and a
# failed step does not stop the next; about 7 minutes at most, all told (11 with vLLM installed:
# bench_vllm.log).
# Exits nonzero if any step failed.
set -u
OUT="${1:?usage: bash benchmarks/gpu_check.sh <outdir>}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
FAILED=()

# step NAME SECONDS LOG COMMAND...: run COMMAND under a timeout, output to LOG.
step() {
  local name="$1" limit="$2" log="$3" start rc
  shift 3
  start=$SECONDS
  echo "[gpu_check] $name (limit ${limit}s) -> $log"
  timeout --kill-after=20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "[gpu_check] $name: rc=$rc, $((SECONDS - start))s" | tee -a "$OUT/steps.log"
  [ "$rc" -eq 0 ] || FAILED+=("$name (rc=$rc)")
}

step nvidia-smi 20 "$OUT/nvidia-smi.txt" nvidia-smi
step versions 30 "$OUT/versions.txt" "$PY" -c '
import platform, torch, triton
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("triton", triton.__version__)
for name in ("pytest", "pytest_benchmark", "matplotlib", "pybind11", "transformers", "liger_kernel"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", repr(exc))
'
NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
{ echo "nvcc: $NVCC"; timeout 20 "$NVCC" --version; } >>"$OUT/versions.txt" 2>&1

export MAX_JOBS=16
step build 150 "$OUT/build.log" env RLHF_ENGINE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step import 30 "$OUT/build.log" "$PY" -c '
import torch, rlhf_engine
from rlhf_engine import _native
print("cpu kernels:", _native.CPU_ERROR or "ok", "| cuda kernels:", _native.CUDA_ERROR or "ok")
assert _native.CUDA_ERROR is None, _native.CUDA_ERROR
'

step tests-cuda 60 "$OUT/tests.log" "$PY" -m pytest tests -m cuda -v -p no:cacheprovider \
  --junitxml="$OUT/junit-cuda.xml"
# The rest of tests/ops (torch and cpu backends; the Triton-interpreter tests
# are skipped where a GPU is present), only while time allows.
if [ "$SECONDS" -lt 200 ]; then
  step tests-ops 45 "$OUT/tests.log" "$PY" -m pytest tests/ops -m "not cuda" -q -p no:cacheprovider \
    --junitxml="$OUT/junit-ops.xml"
else
  echo "[gpu_check] tests-ops: skipped (${SECONDS}s spent)" | tee -a "$OUT/steps.log"
fi

# The benchmarks get what is left of about 7 minutes (at least 60 s); they
# write their results even when stopped by the timeout (SIGTERM).
left=$((420 - SECONDS)); [ "$left" -ge 60 ] || left=60
step bench "$left" "$OUT/bench.log" env RLHF_ENGINE_BENCH_OUT="$OUT" RLHF_ENGINE_BENCH_COMPILE_TIMEOUT=60 \
  "$PY" -m pytest benchmarks -q -p no:cacheprovider -W ignore::DeprecationWarning -k "not rollout_vllm" \
  --benchmark-columns=min,median,max,rounds --benchmark-sort=name --junitxml="$OUT/junit-bench.xml"

# vLLM rollouts (issue 17): vLLM's sampler beside the engine's and generate, up to a ~0.5B body
# (benchmarks/engine/bench_rollout.py::test_rollout_vllm), where vLLM is installed: this script installs
# nothing (no network on the lent machine). Start-up, sync and rollout times are printed to bench_vllm.log.
if "$PY" -c 'import vllm' >/dev/null 2>&1; then
  step bench-vllm 240 "$OUT/bench_vllm.log" "$PY" -m pytest benchmarks/engine/bench_rollout.py -k rollout_vllm -s -q \
    -p no:cacheprovider -W ignore::DeprecationWarning --benchmark-disable
else
  echo "[gpu_check] bench-vllm: skipped (vllm does not import; pip install rlhf_engine[vllm])" | tee -a "$OUT/steps.log"
fi

echo "[gpu_check] total ${SECONDS}s; results in $OUT" | tee -a "$OUT/steps.log"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "[gpu_check] FAILED: ${FAILED[*]}" | tee -a "$OUT/steps.log"
  exit 1
fi
echo "[gpu_check] all steps passed" | tee -a "$OUT/steps.log"
