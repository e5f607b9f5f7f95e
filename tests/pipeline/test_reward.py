"""Reward-model stage: the per-element ranking loss against an independent
reference, each response encoded once, margins, and learning an easy
preference."""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, LlamaConfig, LlamaForSequenceClassification

from rlhf_engine.models.scalar_heads import sequence_scores
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline.data import Comparison, Demonstration, Ranking, encode_record
from rlhf_engine.pipeline.reward import RMConfig, collate_preferences, preference_loss, train_reward_model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny_rm(vocab_size, seed=0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0))


RECORDS = [Comparison("sort: cab", "abc", "cab", margin=0.5), Ranking("reverse: abc", ["cba", "abc", "bca", "a"]),
           Comparison("upper: ab", "AB", "ab"), Ranking("count a: aab", ["2", "1", "3"])]


def test_collate_preferences_lays_out_rows_and_pairs(tok):
    batch = collate_preferences([encode_record(tok, r) for r in RECORDS], tok.pad_token_id)
    assert batch.tokens.input_ids.shape[0] == 2 + 4 + 2 + 3  # each response once
    assert batch.num_elements == 4 and batch.num_pairs == 1 + 6 + 1 + 3
    groups = {g.pairs_per_element: g for g in batch.groups}
    assert sorted(groups) == [1, 3, 6]
    assert groups[1].chosen.tolist() == [0, 6] and groups[1].rejected.tolist() == [1, 7]
    assert groups[1].margin.tolist() == [0.5, 0.0]
    assert groups[6].chosen.tolist() == [2, 2, 2, 3, 3, 4] and groups[6].rejected.tolist() == [3, 4, 5, 4, 5, 5]
    assert groups[3].chosen.tolist() == [8, 8, 9] and groups[3].rejected.tolist() == [9, 10, 10]


def test_preference_loss_is_the_mean_over_elements_of_each_ones_pair_mean(tok):
    batch = collate_preferences([encode_record(tok, r) for r in RECORDS], tok.pad_token_id)
    scores = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).float()
    scores.requires_grad_(True)
    loss, correct = preference_loss(scores, batch)

    s = scores.detach().double()

    def pair(i, j, m=0.0):
        return -F.logsigmoid(s[i] - s[j] - m)

    elements = [pair(0, 1, 0.5),
                torch.stack([pair(2 + i, 2 + j) for i in range(4) for j in range(i + 1, 4)]).mean(),
                pair(6, 7),
                torch.stack([pair(8 + i, 8 + j) for i in range(3) for j in range(i + 1, 3)]).mean()]
    assert loss.item() == pytest.approx(torch.stack(elements).mean().item(), rel=1e-6)
    pairs = [(0, 1), (6, 7)] + [(2 + i, 2 + j) for i in range(4) for j in range(i + 1, 4)] + \
        [(8 + i, 8 + j) for i in range(3) for j in range(i + 1, 3)]
    assert correct.item() == sum(bool(s[i] > s[j]) for i, j in pairs)
    loss.backward()
    assert scores.grad.abs().min() > 0  # every response gets a gradient
    with pytest.raises(ValueError, match="scores must have shape"):
        preference_loss(scores[:5], batch)


def test_each_ranked_response_is_encoded_once(tok):
    model = tiny_rm(len(tok))
    rows = []
    model.base_model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    ranking = Ranking("reverse: abcd", ["dcba", "dcab", "abcd", "a"])
    train_reward_model(model, tok, [ranking], [], RMConfig(max_steps=1, batch_size=1))
    assert rows == [4]  # one forward of K=4 rows, not 6 pairs x 2


def test_margin_raises_the_loss(tok):
    model = tiny_rm(len(tok))
    plain = Comparison("sort: cab", "abc", "cab")
    with_margin = Comparison("sort: cab", "abc", "cab", margin=2.0)
    losses = []
    for record in (plain, with_margin):
        batch = collate_preferences([encode_record(tok, record)], tok.pad_token_id)
        scores = sequence_scores(model, batch.tokens.input_ids, batch.tokens.attention_mask)
        losses.append(preference_loss(scores, batch)[0])
        diff = (scores[0] - scores[1]).double()
    assert losses[0].item() == pytest.approx(-F.logsigmoid(diff).item(), rel=1e-5)
    assert losses[1].item() == pytest.approx(-F.logsigmoid(diff - 2.0).item(), rel=1e-5)


def _marker_records(n, seed):
    """Comparisons and rankings where a response ending in "!" beats "?", which beats "."."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
        prompt = f"echo: {word}"
        if i % 3 == 0:
            records.append(Ranking(prompt, [word + "!", word + "?", word + "."]))
        else:
            records.append(Comparison(prompt, word + "!", word + "?", margin=0.5 if i % 2 else None))
    return records


def test_reward_model_learns_an_easy_preference(tok):
    model = tiny_rm(len(tok))
    held = _marker_records(30, seed=1)
    batch = collate_preferences([encode_record(tok, r) for r in held], tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, batch.tokens.input_ids, batch.tokens.attention_mask)
    assert preference_loss(scores, batch)[1].item() / batch.num_pairs < 0.5  # untrained
    logged = []
    out = train_reward_model(model, tok, _marker_records(96, seed=0), held,
                             RMConfig(max_steps=32, batch_size=16, lr=1e-2, eval_every=8), on_step=logged.append)
    accuracies = [m["eval_accuracy"] for m in logged if "eval_accuracy" in m]
    assert len(accuracies) == 4 and out["eval_accuracy"] == accuracies[-1]
    assert out["eval_accuracy"] >= 0.95
    assert out["eval_loss"] < 0.5 and all(0 <= m["accuracy"] <= 1 for m in logged)
    assert out["train_examples"] == 96 and out["eval_examples"] == 30


def test_rm_config_and_record_checks(tok):
    for field in RMConfig.__dataclass_fields__.values():
        assert field.metadata.get("help"), field.name
    (config,) = HfArgumentParser(RMConfig).parse_args_into_dataclasses(["--eval_every", "5"])
    assert config.eval_every == 5 and config.lr == 3e-4
    with pytest.raises(ValueError, match=r"train_records\[0\] must be one of \['Comparison', 'Ranking'\]"):
        train_reward_model(tiny_rm(len(tok)), tok, [Demonstration("p", "r")], [], RMConfig(max_steps=1))
    with pytest.raises(ValueError, match="config must be an RMConfig"):
        train_reward_model(tiny_rm(len(tok)), tok, RECORDS, [], object())
