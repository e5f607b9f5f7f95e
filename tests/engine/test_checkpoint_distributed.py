"""Sharded checkpoints: 2 CPU ranks (gloo) shard a tiny Llama with FSDP2,
take an AdamW step and save; a single process without a process group and
2 ranks load it back. The ranks run tests/engine/checkpoint_ranks.py."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlhf_engine.checkpoint import latest_checkpoint, load_checkpoint
from tests.engine.checkpoint_ranks import adamw, build
from tests.helpers import same_bits
from tests.ranks import run_ranks

WORKER = Path(__file__).with_name("checkpoint_ranks.py")


def launch(mode, root, out, world_size=2, timeout=400):
    """Run ``checkpoint_ranks.py mode root out`` on ``world_size`` ranks; return rank 0's results."""
    results = run_ranks([[WORKER, mode, root, out]] * world_size, timeout=timeout)
    for rank, (code, log, _) in enumerate(results):
        assert code == 0, f"{mode}: rank {rank} exited with {code}:\n{log[-3000:]}"
    return torch.load(Path(out) / f"{mode}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(root, saved, resumed)``: the checkpoints and rank 0's results of both launches."""
    root, out = tmp_path_factory.mktemp("checkpoints"), tmp_path_factory.mktemp("results")
    return root, launch("save", root, out), launch("resume", root, out)


def assert_same(got, want, where="state"):
    """Equal nested states: tensors bit for bit, other values with ==."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and same_bits(got, want), where
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_single_process_loads_into_an_unsharded_model(runs):
    root, saved, _ = runs
    path = latest_checkpoint(root)
    assert path == root / "step-00000001"
    model = build(seed=5)  # other weights, no optimizer state yet
    optimizer = adamw(model)
    sd_model, sd_optim = get_state_dict(model, optimizer)
    tensors, objects = load_checkpoint(path, {"model": sd_model, "optim": sd_optim})
    assert tensors["model"] is sd_model and objects == {"step": 1}
    set_state_dict(model, optimizer, model_state_dict=sd_model, optim_state_dict=sd_optim)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    got_model, got_optim = get_state_dict(model, optimizer)
    assert_same(got_model, saved["saved"]["model"], "model")
    assert_same(got_optim, saved["saved"]["optim"], "optim")


def test_single_process_reads_it_whole_without_templates(runs):
    root, saved, _ = runs
    tensors, _ = load_checkpoint(latest_checkpoint(root))
    assert_same(tensors["model"], saved["saved"]["model"], "model")
    assert_same(tensors["optim"], saved["saved"]["optim"], "optim")
    assert tensors["model"]["lm_head.weight"] is tensors["model"]["model.embed_tokens.weight"]


def test_two_ranks_resume_and_continue_identically(runs):
    _, saved, resumed = runs
    assert resumed["objects"] == {"step": 1}
    assert_same(resumed["after"], saved["after"], "after steps 2-3")


def test_a_rank_failing_to_write_fails_the_save_on_every_rank(runs):
    root, saved, _ = runs
    own, other = saved["failures"][1], saved["failures"][0]
    intact = f"; the previous checkpoint {root / 'step-00000001'} is intact"
    assert own.startswith(f"CheckpointSaveError: cannot save checkpoint step 2 under {root}: disk full (writing ")
    assert own.endswith(intact)
    assert other.startswith(f"CheckpointSaveError: cannot save checkpoint step 2 under {root}: writing the tensors "
                            f"of checkpoint step 2 failed on rank 1: OSError: disk full") and other.endswith(intact)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]


def test_every_ranks_shards_have_checksums(runs):
    root, _, _ = runs
    path = root / "step-00000001"
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == ["objects.pt", "tensors/.metadata", "tensors/__0_0.distcp", "tensors/__1_0.distcp"]
    for name, record in files.items():
        assert record["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest(), name


def test_two_ranks_refuse_a_damaged_shard(runs):
    _, _, resumed = runs
    for rank, message in enumerate(resumed["damaged"]):  # rank 1 verifies the shard, rank 0 hears of it
        assert message.startswith("CheckpointError: " + ("" if rank else "loading checkpoint ")), message
        assert "damaged checkpoint" in message and "tensors/__1_0.distcp does not match its sha256" in message
