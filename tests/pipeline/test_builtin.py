"""The built-in pipeline end to end, shortened (--quick): every stage, the
report, its plots and summary, the model folders read back by transformers,
and --resume of a finished run."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine import cli
from rlhf_engine.pipeline import builtin, report, task
from rlhf_engine.pipeline.data import Comparison, encode_prompt, read_jsonl

SUMMARY_KEYS = ("rm_accuracy", "win_rate", "win_rate_ci_low", "mean_kl", "kl_bound", "wall_seconds")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    status = cli.main(["pipeline", "--quick", "--out", str(out), "--ppo_iterations", "4"])
    return status, out


def test_quick_pipeline_writes_the_report(quick_run):
    status, out = quick_run
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], float), key
    assert 0 <= summary["win_rate_ci_low"] <= summary["win_rate"] <= summary["win_rate_ci_high"] <= 1
    assert summary["wins"] + summary["ties"] + summary["losses"] == summary["win_n"] == builtin.QUICK["heldout_prompts"]
    assert summary["kl_bound"] == builtin.TaskConfig().kl_bound
    text = (out / "report.md").read_text()
    for plot in report.PLOTS.values():
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in text
    assert "win rate" in text and "95% interval" in text
    config = json.loads((out / "config.json").read_text())
    assert config["ppo_iterations"] == 4 and config["sft_max_steps"] == builtin.QUICK["sft_max_steps"]
    assert config["threads"] == 1


def test_quick_pipeline_records_every_stage(quick_run):
    _, out = quick_run
    rows = report.read_metrics(out)
    stages = {row["stage"] for row in rows}
    assert stages == {"sft", "rm", "ppo", "ppo_nokl"}
    assert report.series(rows, "ppo", "kl/k1")[0] == [1, 2, 3, 4]
    assert report.series(rows, "ppo", "probe/gold")[0] == [0, 2, 4]  # the start, every 2 and the last
    assert report.series(rows, "sft", "eval_loss")[0] == [2, 4]
    for name in builtin.DATA_FILES.values():
        assert (out / "data" / name).is_file()
    assert list((out / "tb").iterdir())


def test_win_rate_is_recomputable_from_the_saved_responses(quick_run):
    _, out = quick_run
    rows = [json.loads(line) for line in (out / "eval" / "responses.jsonl").read_text().splitlines()]
    prompts = [p.prompt for p in read_jsonl(out / "data" / "heldout_prompts.jsonl", "prompts")]
    assert [row["prompt"] for row in rows] == prompts
    ppo = [task.gold_score(row["prompt"], row["ppo"]) for row in rows]
    sft = [task.gold_score(row["prompt"], row["sft"]) for row in rows]
    assert ppo == [row["ppo_gold"] for row in rows] and sft == [row["sft_gold"] for row in rows]
    wins = sum(a > b for a, b in zip(ppo, sft))
    ties = sum(a == b for a, b in zip(ppo, sft))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["wins"], summary["ties"]) == (wins, ties)
    assert summary["win_rate"] == (wins + ties / 2) / len(rows)
    assert summary["mean_kl"] == pytest.approx(sum(row["ppo_kl"] for row in rows) / len(rows))


def test_stage_model_folders_load_in_transformers(quick_run):
    _, out = quick_run
    tok = AutoTokenizer.from_pretrained(out / "sft" / "model")
    ids = torch.tensor([encode_prompt(tok, "sort: cab")])
    for stage in ("sft", "ppo", "ppo_nokl"):
        model = AutoModelForCausalLM.from_pretrained(out / stage / "model")
        assert model.config.num_hidden_layers == builtin.TaskConfig().policy_layers
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    assert rm(ids).logits.shape == (1, 1)


def test_resume_of_a_finished_run_skips_every_stage(quick_run, capsys):
    status, out = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert cli.main(["pipeline", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().err
    for stage in ("sft", "rm", "ppo", "ppo_nokl"):
        assert f"{stage}: already done, skipped" in log
    again = json.loads((out / "summary.json").read_text())
    assert again["win_rate"] == summary["win_rate"] and again["rm_accuracy"] == summary["rm_accuracy"]
    assert cli.main(["pipeline", "--quick", "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_task_tokenizer_keeps_task_characters_single_tokens():
    tok = builtin.task_tokenizer(300)
    for text in ("abcdef", "ABCDEF", "0123456789"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(tok("reverse", add_special_tokens=False)["input_ids"]) == 1


def test_gold_labelled_puts_the_better_response_first():
    comparisons = task.make_comparisons(50, seed=3, beta=0.0)  # coin-flip labels: many wrong
    fixed = builtin.gold_labelled(comparisons)
    assert any(a.chosen != b.chosen for a, b in zip(comparisons, fixed))
    for old, new in zip(comparisons, fixed):
        assert {new.chosen, new.rejected} == {old.chosen, old.rejected}
        assert task.gold_score(new.prompt, new.chosen) > task.gold_score(new.prompt, new.rejected)
    assert builtin.gold_labelled([Comparison("sort: ba", "ab", "ba")]) == [Comparison("sort: ba", "ab", "ba")]
