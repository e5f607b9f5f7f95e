"""One rank of test_checkpoint_distributed.py (launched once per rank with
RANK/WORLD_SIZE/MASTER_* set): a tiny Llama (tied embeddings) sharded with
FSDP2, AdamW steps, checkpoints.

    python checkpoint_ranks.py save ROOT OUT     step 1, saves step 1, a save of step 2 that fails
                                                 on rank 1, steps 2-3; rank 0 writes OUT/save.pt
    python checkpoint_ranks.py resume ROOT OUT   another init, loading a copy of ROOT's latest with a
                                                 damaged shard fails, loads ROOT's latest, steps 2-3;
                                                 rank 0 writes OUT/resume.pt
"""
import copy
import shutil
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine import distributed
from rlhf_engine import checkpoint

BATCH = 4  # rows of the global batch, split over the ranks


def build(seed):
    """The tiny Llama, unsharded."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def adamw(model):
    """The optimizer (made after sharding: FSDP2 replaces the parameters)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def batch(step):
    """``[BATCH, 8]`` token ids of training step ``step`` (the same on every rank)."""
    return torch.randint(0, 64, (BATCH, 8), generator=torch.Generator().manual_seed(step))


def train_step(model, optimizer, step, where):
    """One AdamW step on ``batch(step)``: each rank its rows, losses summed over ranks."""
    ids = batch(step)[distributed.rows_of_rank(BATCH, where)]
    loss = model(input_ids=ids, labels=ids).loss * ids.shape[0] / BATCH
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_state(model, optimizer):
    """``{"model": ..., "optim": ...}``: a copy of the full CPU state on rank 0
    (a collective; copied: plain CPU tensors such as AdamW's ``step`` are the live ones)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return copy.deepcopy({"model": distributed.full_state_dict(model),
                          "optim": get_optimizer_state_dict(model, optimizer, options=options)})


def failing_save(root, state, where):
    """Save ``state`` as step 2 with rank 1's writes of its shards failing: every rank must raise."""
    import torch.distributed.checkpoint.filesystem as fs

    write_item = fs._write_item
    if where.rank == 1:
        def disk_full(*args, **kwargs):
            raise OSError("disk full")
        fs._write_item = disk_full
    try:
        checkpoint.save_checkpoint(root, 2, state, {"step": 2})
    except checkpoint.CheckpointError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        fs._write_item = write_item
    return "no error"


def load_damaged(path, out, templates, where):
    """Load a copy of checkpoint ``path`` whose last shard file (one rank 1
    verifies) has flipped bytes: every rank must raise."""
    damaged = Path(out) / "damaged"
    if where.is_main:
        shutil.copytree(path, damaged)
        shard = sorted((damaged / "tensors").glob("*.distcp"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    distributed.all_gather_object(None)  # the copy is there for every rank
    try:
        checkpoint.load_checkpoint(damaged, templates)
    except checkpoint.CheckpointError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main(mode, root, out):
    torch.set_num_threads(1)
    where = distributed.init(timeout_s=60)
    model = distributed.shard(build(seed=0 if mode == "save" else 7), where, torch.device("cpu"))
    optimizer = adamw(model)
    if mode == "save":
        train_step(model, optimizer, 1, where)
        sd_model, sd_optim = get_state_dict(model, optimizer)
        checkpoint.save_checkpoint(root, 1, {"model": sd_model, "optim": sd_optim}, {"step": 1})
        saved = full_state(model, optimizer)
        failure = failing_save(root, {"model": sd_model}, where)
        results = {"saved": saved, "failures": distributed.all_gather_object(failure)}
    else:
        sd_model, sd_optim = get_state_dict(model, optimizer)
        path = checkpoint.latest_checkpoint(root)
        damaged = load_damaged(path, out, {"model": sd_model, "optim": sd_optim}, where)
        _, objects = checkpoint.load_checkpoint(path, {"model": sd_model, "optim": sd_optim})
        set_state_dict(model, optimizer, model_state_dict=sd_model, optim_state_dict=sd_optim)
        results = {"objects": objects, "damaged": distributed.all_gather_object(damaged)}
    for step in (2, 3):
        train_step(model, optimizer, step, where)
    results["after"] = full_state(model, optimizer)
    if where.is_main:
        torch.save(results, Path(out) / f"{mode}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
