"""The run folder, resumable training loops and the PPO stage's pieces:
exact resume of the shared loop, the prompt stream, the probe's KL against
an independent computation, metrics files."""
import json
import random
import signal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_engine.models.prompts import left_pad
from rlhf_engine.engine.rollout import sample
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline.data import encode_prompt
from rlhf_engine.pipeline.ppo_stage import PolicyProbe, prompt_batches, summarize
from rlhf_engine.pipeline.report import moving_average, read_metrics, series
from rlhf_engine.pipeline.run import Run, UsageError
from rlhf_engine.pipeline.training import TrainConfig, train_loop
from tests.helpers import linear_task, saved_steps


def test_train_loop_resumes_exactly_where_it_stopped(tmp_path):
    config = TrainConfig(max_steps=7, batch_size=5, lr=0.05, warmup_ratio=0.3, save_every=2)
    model, step, evaluate = linear_task()
    logged = []
    full = train_loop(model, config, 12, step, evaluate, on_step=logged.append)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, step, evaluate = linear_task()
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    first = train_loop(model, config, 12, step, evaluate, stop=stop, checkpoints=tmp_path)
    assert first["stopped"] and first["steps"] == 3
    assert saved_steps(tmp_path) == [2, 3]  # every save_every steps, then on the stop

    model, step, evaluate = linear_task(model_seed=5)  # other weights: the checkpoint must restore them
    resumed_log = []
    second = train_loop(model, config, 12, step, evaluate, on_step=resumed_log.append, checkpoints=tmp_path,
                        resume=True)
    assert [m["step"] for m in resumed_log] == [4, 5, 6, 7]
    assert [m["lr"] for m in resumed_log] == [m["lr"] for m in logged[3:]]
    assert [m["loss"] for m in resumed_log] == [m["loss"] for m in logged[3:]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert second["steps"] == full["steps"] == 7 and not second["stopped"]


def test_train_loop_does_not_checkpoint_after_the_last_step(tmp_path):
    model, step, evaluate = linear_task()
    train_loop(model, TrainConfig(max_steps=4, batch_size=6, save_every=2), 12, step, evaluate,
               checkpoints=tmp_path)
    assert saved_steps(tmp_path) == [2]


def test_prompt_batches_are_a_seeded_stream_that_resumes_at_a_position():
    stream = prompt_batches(5, 3, seed=7)
    first = [next(stream) for _ in range(4)]
    assert all(len(b) == 3 for b in first)
    flat = sum(first, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # one permutation per epoch
    resumed = prompt_batches(5, 3, seed=7, start=6)
    assert [next(resumed) for _ in range(2)] == first[2:]
    assert next(prompt_batches(5, 3, seed=8)) != first[0] or next(prompt_batches(5, 3, seed=9)) != first[0]


def tiny_lm(vocab_size, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def test_probe_kl_is_the_summed_log_ratio_of_the_sampled_tokens():
    tok = byte_tokenizer()
    policy, reference = tiny_lm(len(tok), 0), tiny_lm(len(tok), 1)
    prompts = ["sort: cab", "reverse: abcd", "upper: fe"]
    probe = PolicyProbe(tok, prompts, {"length": lambda p, r: [len(x) for x in r]}, reference, max_new_tokens=5,
                        temperature=0.7, seed=3, batch_size=2)
    responses, kls = probe.sample(policy)
    assert probe.sample(policy) == (responses, kls)  # the same seed every call
    assert probe.sample(reference)[1] == [0.0, 0.0, 0.0]
    # independent reference: the same draws (same sampler, each batch's seed drawn from random.Random(seed)),
    # scored by both models' full logits
    seeds = random.Random(3)
    expected = []
    for batch in (prompts[:2], prompts[2:]):
        ids, mask = left_pad([encode_prompt(tok, p) for p in batch], tok.pad_token_id)
        generator = torch.Generator().manual_seed(seeds.getrandbits(63))
        rollout = sample(policy, ids, mask, probe.params, generator=generator)
        seq, target = rollout.sequences, rollout.response_mask[:, 1:]
        total = torch.zeros(len(batch), dtype=torch.float64)
        for model, sign in ((policy, 1), (reference, -1)):
            logits = model(input_ids=seq, attention_mask=rollout.attention_mask.long(),
                           position_ids=rollout.position_ids).logits[:, :-1].double() / 0.7
            logp = logits.log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)
            total += sign * torch.where(target, logp, 0.0).sum(-1)
        expected += total.tolist()
    assert kls == pytest.approx(expected, abs=1e-4)
    assert max(abs(x) for x in expected) > 0.01  # the two models differ enough for the check to mean something
    metrics = probe(policy)
    assert metrics["probe/length"] == sum(len(r) for r in responses) / 3
    assert metrics["probe/kl"] == pytest.approx(sum(kls) / 3)


def test_run_folder_records_metrics_results_and_refuses_to_overwrite(tmp_path):
    folder = tmp_path / "run"
    with Run(folder, "test", {"lr": 0.1}, progress=False) as run:
        run.record("sft", 1, {"step": 1, "loss": 2.0, "info/name": "x", "bad": float("nan")})
        run.record("sft", 2, {"loss": 1.0})
        assert run.result("sft") is None
        run.finish("sft", {"steps": 2, "loss": torch.tensor(1.5)})
        assert run.result("sft") == {"steps": 2, "loss": 1.5}
    assert json.loads((folder / "config.json").read_text()) == {"lr": 0.1}
    rows = read_metrics(folder)
    assert rows[0] == {"stage": "sft", "step": 1, "loss": 2.0, "info/name": "x", "bad": None}
    assert series(rows, "sft", "loss") == ([1, 2], [2.0, 1.0])
    assert list((folder / "tb").iterdir()) and "starting" in (folder / "log.txt").read_text()
    with pytest.raises(UsageError, match="not empty: pass --resume"):
        Run(folder, "test", {}).__enter__()
    with pytest.raises(UsageError, match="no run to resume"):
        Run(tmp_path / "other", "test", {}, resume=True).__enter__()
    with Run(folder, "test", {"lr": 0.2}, resume=True, progress=False) as run:
        run.record("sft", 2, {"loss": 0.5})  # a repeated step after a resume replaces the earlier row
    assert series(read_metrics(folder), "sft", "loss") == ([1, 2], [2.0, 0.5])


def test_sigint_asks_the_loop_to_stop_and_a_second_one_raises(tmp_path):
    with Run(tmp_path / "run", "test", {}, progress=False) as run:
        assert not run.should_stop()
        signal.raise_signal(signal.SIGINT)
        assert run.should_stop()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_summaries():
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    history = [{"kl/k1": float(i), "reward/score_mean": float(10 * i)} for i in range(20)]
    history[5]["probe/gold"] = 0.5
    history[15]["probe/gold"] = 0.75
    out = summarize(history)
    assert out == {"kl_mean": 9.5, "score_mean": 95.0, "score_last": 185.0, "probe/gold": 0.75}
