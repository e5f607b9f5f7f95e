"""The engine on 2 CPU ranks (gloo, FSDP2) against one process on the same
global batch: the same metric trajectory (the ranks also split their share
of each mini-batch into micro-batches, the single process does not),
checkpoints that resume on 1 or 2 ranks, and a dead rank named by the
survivors. Each run is
``ppo_ranks.py`` in fresh processes (a few seconds each to start)."""
import json
from pathlib import Path

import pytest
import torch

from tests.ranks import run_ranks

WORKER = Path(__file__).with_name("ppo_ranks.py")
ITERATIONS = 4


def launch(world, out, *args, timeout=400):
    """Run the worker on ``world`` ranks (1: a plain process, no process
    group); returns (exit codes, rank 0's JSON, each rank's seconds)."""
    results = run_ranks([[WORKER, out, *args]] * world, timeout=timeout)
    assert Path(out).exists(), "\n".join(run.output for run in results)
    return [run.code for run in results], json.loads(Path(out).read_text()), [run.seconds for run in results]


def assert_same_trajectory(expected, got):
    """Every metric of every iteration within 1e-5 relative. Two are means
    of differences of log-probs of order 1, which cancel: the sampler-vs-
    trainer gap is float32 rounding itself (~1e-7) and approx-KL is ~1e-3;
    they get an absolute slack of 1e-6 besides."""
    assert [h["iteration"] for h in got] == [h["iteration"] for h in expected]
    for want, have in zip(expected, got):
        assert set(have) == set(want)
        for key, value in want.items():
            slack = 1e-6 if key.startswith("rollout/logprob_gap") or key == "policy/approx_kl" else 0.0
            assert have[key] == pytest.approx(value, rel=1e-5, abs=slack), (want["iteration"], key)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out.json"
    codes, result, _ = launch(1, out, "--iterations", ITERATIONS)
    assert codes == [0] and result["error"] is None
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    codes, result, _ = launch(2, folder / "out.json", "--iterations", ITERATIONS, "--save-at", 2,
                              "--checkpoints", folder / "checkpoints", "--micro-batch-size", 1)
    assert codes == [0, 0] and result["error"] is None
    return result, folder / "checkpoints"


def test_two_ranks_follow_the_one_rank_trajectory(one_rank, two_ranks):
    assert_same_trajectory(one_rank["history"], two_ranks[0]["history"])
    for name, weight in one_rank["lm_head"].items():
        torch.testing.assert_close(torch.tensor(two_ranks[0]["lm_head"][name]), torch.tensor(weight),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_two_rank_checkpoint_resumes_on_any_world_size(one_rank, two_ranks, tmp_path, world):
    codes, result, _ = launch(world, tmp_path / "out.json", "--iterations", ITERATIONS, "--resume", two_ranks[1])
    assert codes == [0] * world and result["error"] is None
    assert_same_trajectory(one_rank["history"][2:], result["history"])


def test_group_baselines_kl_in_loss_and_ptx_follow_one_rank(tmp_path):
    runs = [launch(world, tmp_path / f"out{world}.json", "--iterations", 2, "--group-ptx") for world in (1, 2)]
    for codes, result, _ in runs:
        assert result["error"] is None and set(codes) == {0}
    assert "ptx/loss" in runs[0][1]["history"][0]
    assert_same_trajectory(runs[0][1]["history"], runs[1][1]["history"])


def test_a_dead_rank_is_named_by_the_others(tmp_path):
    codes, result, seconds = launch(2, tmp_path / "out.json", "--iterations", 3, "--die-at", 2)
    assert codes[1] == 9  # rank 1 died during iteration 2's score phase
    assert codes[0] == 1 and len(result["history"]) == 1
    assert result["error"].startswith("RankFailureError: rank 0: PPO iteration 2 failed: rank 1 stopped responding")
    assert seconds[0] - seconds[1] < 60  # from rank 1's death: within the worker's collective timeout
