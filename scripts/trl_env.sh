#!/usr/bin/env bash
# A separate virtual environment for TRL's side of the PPO benchmark
# (benchmarks/engine/trl_ppo.py, issue #5): the project venv's torch and
# transformers (through a .pth file: the same builds, nothing copied) plus
# trl, accelerate, datasets and their few missing dependencies. Nothing is
# installed into the project venv.
#
# Usage: scripts/trl_env.sh [VENV]   (default /tmp/trlvenv; wheels in
# $TRL_WHEELS, default /tmp/trl_dl, are used when present)
set -euo pipefail

MAIN=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/trlvenv}
WHEELS=${TRL_WHEELS:-/tmp/trl_dl}

"$MAIN/.venv/bin/python" -m venv "$VENV"
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site "$MAIN/.venv/bin/python" > "$(site "$VENV/bin/python")/_rlhf_main_venv.pth"

find_links=()
[ -d "$WHEELS" ] && find_links=(--find-links "$WHEELS")
# --no-deps: pip must never replace the project venv's packages (torch, transformers, numpy, ...).
"$VENV/bin/pip" install --no-deps "${find_links[@]}" \
    trl==0.25.0 accelerate==1.15.0 datasets==5.2.0 \
    psutil==7.2.2 pyarrow==26.0.1 dill==0.4.1 pandas==3.1.1 xxhash==4.1.0 multiprocess==0.70.19
# Expected: only "torch ... requires setuptools>=77.0.3" (the venv's own setuptools; unused at run time).
"$VENV/bin/pip" check || true
"$VENV/bin/python" -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers",
transformers.__version__, "trl", trl.__version__)'
