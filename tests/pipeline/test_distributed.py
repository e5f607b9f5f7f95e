"""Data-parallel SFT and reward model: `rlhf-engine` under torchrun on 2 CPU
ranks (gloo) against the same command in one process: the same loss
trajectory, one run folder written by rank 0, a loadable model folder, and a
2-rank checkpoint resumed on 1 rank. Plus the pure pieces: how a global
mini-batch is split over the ranks."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_engine import cli
from rlhf_engine.distributed import Layout
from rlhf_engine.pipeline.report import read_metrics
from rlhf_engine.pipeline.training import TrainConfig, check_world_size, rank_rows
from tests.helpers import torchrun
from tests.ranks import run_ranks

SFT_ARGS = ["--max_steps", "4", "--batch_size", "4", "--eval_every", "2", "--save_every", "2", "--threads", "1"]
RM_ARGS = ["--max_steps", "3", "--batch_size", "4", "--eval_every", "3", "--threads", "1"]


def launch_ranks(rank_args, timeout=400):
    """``python -m rlhf_engine.cli ARGS`` as one rank each (so that the ranks can be given different
    arguments): each one's exit status and output."""
    return run_ranks([["-m", "rlhf_engine.cli", *args] for args in rank_args], timeout=timeout)


def losses(folder, stage, *keys):
    rows = [row for row in read_metrics(folder) if row["stage"] == stage]
    return [(row["step"], *(row.get(key) for key in keys)) for row in rows]


def assert_close_rows(got, want, rel=1e-5):
    assert [row[0] for row in got] == [row[0] for row in want]
    for g, w in zip(got, want):
        assert [x is None for x in g] == [x is None for x in w], (g, w)
        assert [x for x in g if x is not None] == pytest.approx([x for x in w if x is not None], rel=rel,
                                                                abs=1e-7), (g, w)


@pytest.fixture(scope="module")
def sft_runs(workspace, tmp_path_factory):
    """``(one, two)``: the same SFT run folder in one process and on 2 ranks."""
    root = tmp_path_factory.mktemp("sft")
    args = ["sft", "--model", str(workspace / "lm"), "--train_file", str(workspace / "demos.jsonl"), *SFT_ARGS]
    assert cli.main(args + ["--out", str(root / "one")]) == 0
    status, out, err = torchrun(args + ["--out", str(root / "two")])
    assert status == 0, err[-3000:]
    result = json.loads(out)  # rank 0 alone prints the result
    assert result["steps"] == 4 and result["model"] == str(root / "two" / "sft" / "model")
    return root / "one", root / "two"


def test_two_ranks_follow_the_one_rank_loss_trajectory(sft_runs):
    one, two = sft_runs
    keys = ("loss", "grad_norm", "lr", "eval_loss")
    assert_close_rows(losses(two, "sft", *keys), losses(one, "sft", *keys))
    assert [row[0] for row in losses(two, "sft")] == [1, 2, 3, 4]  # one row per step: rank 0 alone records


def test_rank_zero_writes_one_run_folder_with_a_loadable_model(sft_runs):
    one, two = sft_runs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((two / "tb").iterdir())) == 1  # one TensorBoard events file
    model = AutoModelForCausalLM.from_pretrained(two / "sft" / "model")
    reference = AutoModelForCausalLM.from_pretrained(one / "sft" / "model").state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-6)


def test_a_two_rank_checkpoint_resumes_on_one_rank(sft_runs, tmp_path, capsys):
    one, two = sft_runs
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    for path in (cut / "sft" / "result.json", cut / "sft" / "model"):  # as if it had stopped after step 2
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert [p.name for p in (cut / "sft" / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert cli.main(["sft", "--out", str(cut), "--resume"]) == 0
    capsys.readouterr()
    keys = ("loss", "grad_norm", "eval_loss")
    assert_close_rows(losses(cut, "sft", *keys)[2:], losses(one, "sft", *keys)[2:])


def test_reward_model_on_two_ranks_matches_one(workspace, tmp_path):
    args = ["rm", "--model", str(workspace / "lm"), "--rankings", str(workspace / "rankings.jsonl"),
            "--demonstrations", str(workspace / "demos.jsonl"), *RM_ARGS]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    status, _, err = torchrun(args + ["--out", str(tmp_path / "two")])
    assert status == 0, err[-3000:]
    keys = ("loss", "accuracy", "grad_norm", "eval_loss", "eval_accuracy", "reward/offset")
    assert_close_rows(losses(tmp_path / "two", "rm", *keys), losses(tmp_path / "one", "rm", *keys))


def test_ranks_started_with_different_options_stop_with_one_line(workspace, tmp_path):
    args = ["sft", "--model", str(workspace / "lm"), "--train_file", str(workspace / "demos.jsonl"), *SFT_ARGS,
            "--out", str(tmp_path / "run")]
    results = launch_ranks([args + ["--lr", "0.001"], args + ["--lr", "0.002"]])
    for status, err, _ in results:
        assert status == 2 and "Traceback" not in err, err[-2000:]
        assert "error (rank" in err and "ranks disagree on options: rank 1: lr=0.002 (rank 0: 0.001)" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_rank_rows_split_a_batch_evenly_and_give_an_empty_share_a_dummy_row():
    batch = list(range(8))
    assert [rank_rows(batch, Layout(r, 2)) for r in range(2)] == [([0, 1, 2, 3], 1.0), ([4, 5, 6, 7], 1.0)]
    short = [10, 11, 12]  # an epoch's last mini-batch
    assert [rank_rows(short, Layout(r, 4)) for r in range(4)] == [([10], 0.0), ([10], 1.0), ([11], 1.0),
                                                                  ([12], 1.0)]
    assert rank_rows(short, Layout()) == (short, 1.0)


def test_batch_size_must_divide_by_the_world_size():
    check_world_size(TrainConfig(batch_size=6), Layout(0, 3))
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 4 ranks"):
        check_world_size(TrainConfig(batch_size=6), Layout(0, 4))
