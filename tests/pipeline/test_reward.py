"""Reward-model stage: the per-element ranking loss against an independent
reference, each response encoded once, margins, learning an easy
preference, and the normalisation that makes held-out demonstrations score
0 on average (in the library and through `rlhf-engine rm`)."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, LlamaConfig, LlamaForSequenceClassification

from rlhf_engine import cli
from rlhf_engine.models.scalar_heads import sequence_scores
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline import batching, builtin
from rlhf_engine.pipeline.data import Comparison, Demonstration, Ranking, encode_pair, encode_record, read_jsonl
from rlhf_engine.pipeline.reward import (RMConfig, collate_preferences, normalize_scores, preference_loss,
                                         score_rows, train_reward_model)
from rlhf_engine.pipeline.run import load_reward_model
from rlhf_engine.pipeline.sft import SFTConfig


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
    train_reward_model(model, tok, [ranking], [], RMConfig(max_steps=1, batch_size=1, normalize_rewards=False))
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
    demonstrations = _marker_demonstrations(20, seed=2)
    out = train_reward_model(model, tok, _marker_records(96, seed=0), held,
                             RMConfig(max_steps=32, batch_size=16, lr=1e-2, eval_every=8),
                             demonstrations=demonstrations, on_step=logged.append)
    accuracies = [m["eval_accuracy"] for m in logged if "eval_accuracy" in m]
    assert len(accuracies) == 4 and out["eval_accuracy"] == accuracies[-1]
    assert out["eval_accuracy"] >= 0.95
    assert out["eval_loss"] < 0.5 and all(0 <= m["accuracy"] <= 1 for m in logged)
    assert out["train_examples"] == 96 and out["eval_examples"] == 30
    # normalised after the last step: the demonstrations score 0 on average, the offset in the last step's metrics
    assert [("reward/offset" in m) for m in logged] == [False] * 31 + [True]
    assert out["reward/offset"] == logged[-1]["reward/offset"] == model.config.score_offset
    assert out["reward/offset_examples"] == 20 and abs(out["reward/offset"]) > 0.1
    assert mean_score(model, tok, demonstrations) == pytest.approx(0.0, abs=1e-4)


def test_rm_config_and_record_checks(tok):
    for field in RMConfig.__dataclass_fields__.values():
        assert field.metadata.get("help"), field.name
    (config,) = HfArgumentParser(RMConfig).parse_args_into_dataclasses(["--eval_every", "5"])
    assert config.eval_every == 5 and config.lr == 3e-4
    with pytest.raises(ValueError, match=r"train_records\[0\] must be one of \['Comparison', 'Ranking'\]"):
        train_reward_model(tiny_rm(len(tok)), tok, [Demonstration("p", "r")], [],
                           RMConfig(max_steps=1, normalize_rewards=False))
    with pytest.raises(ValueError, match="config must be an RMConfig"):
        train_reward_model(tiny_rm(len(tok)), tok, RECORDS, [], object())
    # normalisation (on by default) needs demonstrations, refused before any training
    model = tiny_rm(len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="normalize_rewards needs held-out demonstrations"):
        train_reward_model(model, tok, RECORDS, [], RMConfig(max_steps=1))
    with pytest.raises(ValueError, match="demonstrations is empty"):
        train_reward_model(model, tok, RECORDS, [], RMConfig(max_steps=1), demonstrations=[])
    with pytest.raises(ValueError, match=r"demonstrations\[0\] must be one of \['Demonstration'\]"):
        train_reward_model(model, tok, RECORDS, [], RMConfig(max_steps=1), demonstrations=RECORDS[:1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert getattr(model.config, "score_offset", None) is None


def _marker_demonstrations(n, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return [Demonstration(f"echo: {word}", word + rng.choice("!?.")) for word in words]


def mean_score(model, tok, demonstrations):
    """The mean of sequence_scores over (prompt, response + EOS), one unpadded row at a time."""
    scores = []
    with torch.no_grad():
        for demo in demonstrations:
            ids = torch.tensor([sum(encode_pair(tok, demo.prompt, demo.response), [])])
            scores.append(sequence_scores(model, ids, torch.ones_like(ids)).item())
    return sum(scores) / len(scores)


def test_score_rows_lays_rows_out_as_a_rollout_and_matches_unpadded_scores(tok):
    model = tiny_rm(len(tok)).eval()
    rows = [encode_pair(tok, "sort: cab", "abc"), encode_pair(tok, "reverse: abcdef", "f"),
            ([5, 6], [7, 8, 9, 10, 11])]
    with torch.no_grad():
        got = score_rows(model, rows, tok.pad_token_id)
        for row, score in zip(rows, got.tolist()):
            ids = torch.tensor([list(row[0]) + list(row[1])])
            assert score == pytest.approx(sequence_scores(model, ids, torch.ones_like(ids)).item(), abs=1e-5)
    with pytest.raises(ValueError, match="empty response"):
        score_rows(model, [([1], [])], 0)


def test_normalize_scores_accumulates_onto_an_existing_offset(tok):
    model = tiny_rm(len(tok), seed=3)
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # scores far from 0
    demonstrations = _marker_demonstrations(9, seed=4)
    raw = mean_score(model, tok, demonstrations)
    assert abs(raw) > 0.1
    model.config.score_offset = 2.5
    out = normalize_scores(model, tok, demonstrations, RMConfig(batch_size=4))
    assert out["reward/offset_examples"] == 9
    assert out["reward/offset"] == model.config.score_offset == pytest.approx(raw, abs=1e-5)
    assert mean_score(model, tok, demonstrations) == pytest.approx(0.0, abs=1e-4)
    assert normalize_scores(model, tok, demonstrations, RMConfig())["reward/offset"] == pytest.approx(raw, abs=1e-5)


def rm_command(workspace, out, *extra):
    return cli.main(["rm", "--model", str(workspace / "lm"), "--rankings", str(workspace / "rankings.jsonl"),
                     "--max_steps", "2", "--batch_size", "4", "--lr", "1e-2", "--out", str(out), *extra])


def test_rm_command_normalises_on_held_out_demonstrations(workspace, tmp_path, capsys):
    demos = workspace / "demos.jsonl"
    assert rm_command(workspace, tmp_path / "rm", "--demonstrations", str(demos)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reward/offset_examples"] == 24 and abs(result["reward/offset"]) > 1e-3
    rows = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and rows[-1]["reward/offset"] == result["reward/offset"]
    assert "loss" in rows[-1]  # the last step's record, not a row of its own
    # reloaded from the saved folder: the demonstrations score 0 on average, for every consumer
    model = load_reward_model(str(tmp_path / "rm" / "rm" / "model"))
    assert model.config.score_offset == pytest.approx(result["reward/offset"])
    tok = byte_tokenizer()
    assert mean_score(model, tok, read_jsonl(demos, "demonstrations")) == pytest.approx(0.0, abs=1e-4)

    assert rm_command(workspace, tmp_path / "off", "--normalize_rewards", "false") == 0
    assert "reward/offset" not in json.loads(capsys.readouterr().out)
    assert "score_offset" not in json.loads((tmp_path / "off" / "rm" / "model" / "config.json").read_text())


def test_rm_command_without_demonstrations_is_refused(workspace, tmp_path, capsys):
    assert rm_command(workspace, tmp_path / "rm") == 2
    err = capsys.readouterr().err
    assert "--normalize_rewards" in err and "--demonstrations FILE" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rm").exists()  # refused before the run starts


def test_pipeline_normalises_on_the_demonstrations_sft_held_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pipeline", "--quick", "--out", str(out), "--nokl_iterations", "0", "--ppo_iterations", "1"]) == 0
    capsys.readouterr()
    result = json.loads((out / "rm" / "result.json").read_text())
    sft = builtin.SFT_DEFAULTS
    _, held_out = batching.split_eval(read_jsonl(out / "data" / "demonstrations.jsonl", "demonstrations"),
                                      sft["eval_fraction"], SFTConfig().seed)
    assert result["reward/offset_examples"] == len(held_out) == json.loads(
        (out / "sft" / "result.json").read_text())["eval_examples"]
    model = load_reward_model(str(out / "rm" / "model"))
    assert model.config.score_offset == result["reward/offset"]
    assert mean_score(model, builtin.task_tokenizer(builtin.TaskConfig().vocab_size), held_out) == \
        pytest.approx(0.0, abs=1e-4)
    assert cli.main(["pipeline", "--quick", "--sft_eval_fraction", "0", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--rm_normalize_rewards" in err and "--sft_eval_fraction" in err and not (tmp_path / "no").exists()
