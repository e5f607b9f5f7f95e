"""A PPO run of tiny models on one or more ranks, for
tests/engine/test_engine_distributed.py. Each rank passes its share of a
fixed global prompt batch; rank 0 writes the metrics of each iteration (or
the error that ended the run) as JSON.

    python tests/engine/ppo_ranks.py OUT.json --iterations 4 [--save-at 2 --checkpoints DIR]
                                              [--resume DIR] [--micro-batch-size 1] [--group-ptx]
                                              [--die-at 2]
"""
import argparse
import json
import os
import sys
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_engine import distributed
from rlhf_engine.engine import EngineConfig, RLHFEngine

VOCAB, PAD, EOS = 24, 0, 1
# Eight prompts of different lengths: ranks pad them to different widths.
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14, 15, 16, 17], [18, 19], [20, 21, 22], [5, 6, 7, 8]]


class Tokenizer:
    pad_token_id, eos_token_id = PAD, EOS


def tiny(model_class, seed, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=2, **extra)
    return model_class(config)


# The second estimator's path: group baselines (no critic), the KL in the loss, PPO-ptx.
GROUP_PTX = dict(advantage_estimator="group", samples_per_prompt=2, mini_batch_size=8, kl_in="loss",
                 kl_estimator="k3", ptx_coef=0.1)


def ptx_batch(layout):
    """This rank's rows of a fixed global [8, 10] PPO-ptx batch (each rank's share holds a row for each of
    the iteration's 4 optimizer steps)."""
    ids = torch.arange(80).reshape(8, 10) % (VOCAB - 3) + 3
    mask = torch.ones_like(ids, dtype=torch.bool)
    rows = distributed.rows_of_rank(8, layout)
    return ids[rows], mask[rows], mask[rows]


def build_engine(micro_batch_size=None, **overrides):
    settings = dict(device="cpu", max_new_tokens=6, mini_batch_size=4, micro_batch_size=micro_batch_size,
                    ppo_epochs=2, lr=3e-3, critic_lr=3e-3, critic_init="policy", kl_coef=0.1, kl_target=1.0,
                    kl_horizon=100, lr_schedule="linear", total_steps=40, shard_frozen=True, seed=3)
    settings.update(overrides)
    if settings.get("advantage_estimator", "gae") != "gae":
        del settings["critic_init"]  # no critic to build
    config = EngineConfig(**settings)
    return RLHFEngine(tiny(LlamaForCausalLM, 0), Tokenizer(), config,
                      reward_model=tiny(LlamaForSequenceClassification, 1, num_labels=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--checkpoints")
    parser.add_argument("--resume")
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--group-ptx", action="store_true", help="group baselines, KL in the loss, PPO-ptx")
    parser.add_argument("--die-at", type=int, default=0, help="rank 1 exits abruptly during this iteration's score")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout = distributed.init(timeout_s=60)
    history, error = [], None
    try:
        engine = build_engine(args.micro_batch_size, **(GROUP_PTX if args.group_ptx else {}))
        if args.resume:
            engine.load(args.resume)
        if args.die_at and layout.rank == 1:
            score = engine._score

            def dying_score(rollout):
                if engine.iteration + 1 == args.die_at:
                    os._exit(9)
                return score(rollout)

            engine._score = dying_score
        mine = PROMPTS[distributed.rows_of_rank(len(PROMPTS), layout)]
        while engine.iteration < args.iterations:
            metrics = engine.step(mine, ptx_batch(layout) if args.group_ptx else None)
            history.append({k: v for k, v in metrics.items() if not k.startswith(("time/", "memory/", "info/"))
                            and "per_second" not in k})
            if engine.iteration == args.save_at:
                engine.save(args.checkpoints)
        state = {k: distributed.local_value(v).tolist() for k, v in engine.policy.state_dict().items()
                 if k.endswith("lm_head.weight")}
    except Exception as e:  # the test reads what ended the run
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
        state = {}
    if layout.is_main:
        with open(args.out, "w") as f:
            json.dump({"history": history, "error": error, "lm_head": state}, f)
    distributed.shutdown()
    sys.exit(1 if error else 0)


if __name__ == "__main__":
    main()
