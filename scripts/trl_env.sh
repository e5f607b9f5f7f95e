#!/usr/bin/env bash
# A separate virtual environment for TRL's side of the PPO benchmark
# (benchmarks/engine/trl_ppo.py): the project venv's packages (torch,
# transformers, accelerate, datasets, peft; through a .pth file: the same
# builds, nothing copied) plus TRL 1.12, the last TRL release with a
# PPOTrainer (trl.experimental.ppo). Nothing is installed into the project
# venv.
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
# --no-deps: pip must never replace the project venv's packages (torch, transformers, numpy, ...);
# TRL's own requirements (accelerate, datasets, jinja2, packaging) are in the project venv.
"$VENV/bin/pip" install --no-deps "${find_links[@]}" trl==1.12.0
# Expected: only "torch ... requires setuptools>=77.0.3" (the venv's own setuptools; unused at run time).
"$VENV/bin/pip" check || true
TRL_EXPERIMENTAL_SILENCE=1 "$VENV/bin/python" -c 'import torch, transformers, trl, peft
from trl.experimental.ppo import PPOTrainer
print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft",
      peft.__version__)'
