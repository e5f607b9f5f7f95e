"""rlhf_engine.distributed on 2 CPU ranks (gloo): a rank that stops
responding without dying (its process alive, its heartbeat gone, as a frozen
or deadlocked rank) is named by the rank waiting for it within the timeout,
and disagreeing ranks are named with what differs."""
from tests.ranks import run_ranks

FROZEN = """
import os, time, torch
from rlhf_engine import distributed
layout = distributed.init(timeout_s=4)
if layout.rank == 1:
    distributed._Heartbeat._instance.stopping.set()  # frozen: alive, silent
    time.sleep(15)
    os._exit(0)
with distributed.guard("the test's all-reduce"):
    distributed.all_reduce(torch.ones(1))  # waits for rank 1
"""

DISAGREE = """
from rlhf_engine import distributed
layout = distributed.init(timeout_s=30)
try:
    distributed.check_agreement("the settings", {"lr": 0.1 * (layout.rank + 1), "epochs": 2})
except distributed.DisagreementError as error:
    print(error)
distributed.shutdown()
"""


def test_a_frozen_rank_is_named_within_the_timeout():
    first, second = run_ranks([["-c", FROZEN]] * 2, timeout=60)
    code, output = first.code, first.output
    # Whichever comes first names rank 1: gloo's collective timeout turned into RankFailureError by the
    # guard, or (where a collective would wait on, as NCCL's) the heartbeat thread ending the process.
    assert code == 1, output
    assert "rank 1 stopped responding" in output, output
    assert first.seconds < second.seconds - 5  # rank 0 ends after the 4 s timeout, not after rank 1's 15 s


def test_disagreeing_ranks_are_named_on_every_rank():
    results = run_ranks([["-c", DISAGREE]] * 2, timeout=60)
    for code, output, _ in results:
        assert code == 0, output
        assert "ranks disagree on the settings: rank 1: lr=0.2 (rank 0: 0.1)" in output
