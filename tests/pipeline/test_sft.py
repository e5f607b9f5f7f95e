"""SFT stage and the shared collation: padded/packed tensors, the response-only
loss against a full-logits reference, training, evaluation, stop()."""
import types

import pytest
import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from rlhf_engine.models import causal_lm_logprobs
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline import batching, task
from rlhf_engine.pipeline.data import Comparison, Demonstration
from rlhf_engine.pipeline.sft import SFTConfig, sft_loss, train_sft

ROWS = [([1, 5, 6], [7, 8, 2]), ([1, 9], [3, 4, 5, 2]), ([1, 11, 12, 13], [2])]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny_lm(vocab_size, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))


def test_pad_rows_right_pads_and_masks_responses():
    batch = batching.pad_rows(ROWS, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 3, 4, 5, 2], [1, 11, 12, 13, 2, 0]]
    assert batch.attention_mask.tolist() == [[1] * 6, [1] * 6, [1] * 5 + [0]]
    assert batch.response_mask.int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]]
    assert batch.position_ids is None
    assert batch.num_tokens == 17


def test_pack_rows_concatenates_with_restarting_positions():
    batch = batching.pack_rows(ROWS)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 2, 1, 9, 3, 4, 5, 2, 1, 11, 12, 13, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    assert batch.response_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1]]
    assert batch.attention_mask is None
    assert batch.num_tokens == 17


def test_packed_rows_score_like_padded_rows():
    # transformers 5.x reads restarting position_ids (no attention_mask) as
    # sequence boundaries under every attention implementation: the packed
    # tensors must give each example exactly its padded log-probs.
    model = tiny_lm(32)
    padded, packed = batching.pad_rows(ROWS, 0), batching.pack_rows(ROWS)
    ref = causal_lm_logprobs(model, padded.input_ids, padded.attention_mask, padded.response_mask)
    out = causal_lm_logprobs(model, packed.input_ids, None, packed.response_mask, position_ids=packed.position_ids)
    torch.testing.assert_close(out[packed.response_mask], ref[padded.response_mask])


def test_supports_packing_only_for_flash_attention():
    def model(impl):
        return types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=impl))
    assert batching.supports_packing(model("flash_attention_2"))
    assert not batching.supports_packing(model("sdpa"))
    assert not batching.supports_packing(model("eager"))
    assert not batching.supports_packing(tiny_lm(32))  # sdpa by default


def test_collate_rows_rejects_empty_parts():
    with pytest.raises(ValueError, match="rows"):
        batching.pad_rows([], 0)
    with pytest.raises(ValueError, match=r"rows\[1\] has an empty prompt"):
        batching.pack_rows([([1], [2]), ([], [3])])


def test_shuffled_batches_are_a_seeded_permutation():
    a = batching.shuffled_batches(10, 4, torch.Generator().manual_seed(3))
    b = batching.shuffled_batches(10, 4, torch.Generator().manual_seed(3))
    assert a == b
    assert [len(x) for x in a] == [4, 4, 2]
    assert sorted(sum(a, [])) == list(range(10))
    generator = torch.Generator().manual_seed(3)
    assert batching.shuffled_batches(10, 4, generator) != batching.shuffled_batches(10, 4, generator)
    with pytest.raises(ValueError, match="batch_size"):
        batching.shuffled_batches(10, 0, generator)


def test_split_eval():
    items = list(range(20))
    train, held = batching.split_eval(items, 0.25, seed=1)
    assert len(held) == 5 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert batching.split_eval(items, 0.25, seed=1) == (train, held)
    assert batching.split_eval(items, 0.0, seed=1) == (items, [])
    assert len(batching.split_eval(items, 0.001, seed=1)[1]) == 1
    with pytest.raises(ValueError, match="fraction"):
        batching.split_eval(items, 1.0, seed=1)


def test_sft_loss_is_the_response_token_nll_of_the_full_logits():
    model = tiny_lm(32)
    batch = batching.pad_rows(ROWS, 0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    target = batch.response_mask[:, 1:]
    ref = -(logp * target).sum() / target.sum()
    torch.testing.assert_close(sft_loss(model, batch).double(), ref, rtol=1e-5, atol=1e-6)
    # the mean over every real target differs, so the check above tells the two apart
    assert not torch.isclose(ref, -logp[batch.attention_mask[:, 1:].bool()].mean())


def test_config_parses_with_hf_argument_parser_and_validates():
    for field in SFTConfig.__dataclass_fields__.values():
        assert field.metadata.get("help"), field.name
    (config,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses(["--lr", "0.01", "--max_steps", "7"])
    assert config.lr == 0.01 and config.max_steps == 7 and config.packing is True
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="length_policy"):
        SFTConfig(length_policy="cut")
    with pytest.raises(ValueError, match="warmup_ratio"):
        SFTConfig(warmup_ratio=1.0)


def test_train_sft_lowers_the_loss_and_reports_eval(tok):
    demos = task.make_demonstrations(16, seed=0, noise=0.0)
    model = tiny_lm(len(tok))
    logged = []
    config = SFTConfig(max_steps=30, batch_size=8, lr=1e-2, eval_every=10, warmup_ratio=0.1)
    out = train_sft(model, tok, demos, demos, config, on_step=logged.append)
    assert [m["step"] for m in logged] == list(range(1, 31))
    evals = [m["eval_loss"] for m in logged if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] == out["eval_loss"]
    assert evals[-1] < 0.7 * evals[0]
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"]
    assert out["steps"] == 30 and out["epochs"] == 15 and not out["stopped"] and not out["packed"]
    assert out["train_examples"] == 16 and out["eval_examples"] == 16
    assert out["tokens_per_second"] > 0 and out["steps_per_second"] > 0
    # linear warmup over 3 steps, then linear decay to 0 after step 30
    lrs = [m["lr"] for m in logged]
    assert lrs[:5] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2 * 26 / 27])
    assert lrs[-1] == pytest.approx(1e-2 / 27)


def test_train_sft_honours_stop_and_holds_out_eval(tok):
    demos = task.make_demonstrations(20, seed=1)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    logged = []
    out = train_sft(tiny_lm(len(tok)), tok, demos, None, SFTConfig(max_steps=50, batch_size=4, eval_fraction=0.2),
                    on_step=logged.append, stop=stop)
    assert out["stopped"] and out["steps"] == 3 and len(logged) == 3
    assert "eval_loss" not in out  # no evaluation on the way out
    assert out["train_examples"] == 16 and out["eval_examples"] == 4


def test_train_sft_length_policy_counts_and_bad_records(tok):
    demos = [Demonstration("reverse: abc", "cba"), Demonstration("reverse: abc", "x" * 200)]
    out = train_sft(tiny_lm(len(tok)), tok, demos, [], SFTConfig(max_steps=1, max_length=24, length_policy="drop"))
    assert out["dropped"] == 1 and out["train_examples"] == 1 and "eval_loss" not in out
    with pytest.raises(ValueError, match=r"train_examples\[0\] must be one of \['Demonstration'\]"):
        train_sft(tiny_lm(len(tok)), tok, [Comparison("p", "a", "b")], [], SFTConfig(max_steps=1))
    with pytest.raises(ValueError, match="all 1 examples are longer than max_length=24"):
        train_sft(tiny_lm(len(tok)), tok, demos[1:], [], SFTConfig(max_steps=1, max_length=24, length_policy="drop"))


def test_train_sft_packs_when_the_attention_supports_it(tok, monkeypatch):
    # SDPA honours packed rows in transformers 5.x (see above), so pretending
    # it is flash attention runs the packed path here: same losses as padding.
    demos = task.make_demonstrations(12, seed=2)
    config = SFTConfig(max_steps=2, batch_size=6, lr=1e-2)
    runs = {}
    for packed in (False, True):
        monkeypatch.setattr(batching, "supports_packing", lambda model, packed=packed: packed)
        logged = []
        out = train_sft(tiny_lm(len(tok)), tok, demos, demos, config, on_step=logged.append)
        assert out["packed"] is packed
        runs[packed] = [m["loss"] for m in logged] + [out["eval_loss"]]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert not train_sft(tiny_lm(len(tok)), tok, demos, [], SFTConfig(max_steps=1, packing=False))["packed"]


def test_bf16_autocast_keeps_float32_weights_and_close_losses(tok):
    demos = task.make_demonstrations(8, seed=3)
    losses = {}
    for bf16 in (False, True):
        model, logged = tiny_lm(len(tok)), []
        train_sft(model, tok, demos, [], SFTConfig(max_steps=1, batch_size=8, bf16=bf16), on_step=logged.append)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[bf16] = logged[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
