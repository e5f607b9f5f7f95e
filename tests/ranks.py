"""Several CPU ranks (gloo) for a test: each rank a fresh process with
torchrun's variables set by hand, so that ranks may be given different
arguments and a rank may die without a launcher stopping the others.
``OMP_NUM_THREADS=1`` (two ranks share the test machine's cores)."""
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


def free_port():
    """A port to rendezvous on, below Linux's ephemeral range (32768+), where
    the ranks' own connections could take it between this check and the
    store's bind."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class RankRun(NamedTuple):
    code: int  # exit status
    output: str  # stdout and stderr together
    seconds: float  # from the start to this process's exit


def run_ranks(commands, timeout=400):
    """Run ``commands[r]`` (an argument list, after ``python``) as rank ``r``
    of ``len(commands)``; a single command runs as a plain process (a world of
    one, no process group). Returns a :class:`RankRun` per rank; every
    process is gone on return."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if len(commands) > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(len(commands)))
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO,
                              env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)) if len(commands) > 1 else base,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, command in enumerate(commands)]

    def wait(proc):
        output = proc.communicate(timeout=timeout)[0]
        return RankRun(proc.returncode, output, time.monotonic() - start)

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            return list(pool.map(wait, procs))
    finally:
        for proc in procs:
            proc.kill()
