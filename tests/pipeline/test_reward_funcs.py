"""Reward functions from the command line (``ppo --reward_funcs``,
``--reward_weights``), the reward-hacking diagnostics in a PPO run's
metrics, and the built-in pipeline against the gold reward (``--reward gold``)."""
import json
import math
import re
import textwrap

import pytest

from rlhf_engine import cli
from rlhf_engine.pipeline import task
from tests.helpers import rows

MODULE = "rewards_for_tests"


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module of reward functions on sys.path, as a user's would be."""
    folder = tmp_path / "userland"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(textwrap.dedent("""
        import asyncio

        CALLS = []

        def length(prompts, responses):
            CALLS.append(list(prompts))
            return [float(len(r)) for r in responses]

        async def async_a_count(prompts, responses):
            await asyncio.sleep(0)
            return [float(r.count("a")) for r in responses]

        def broken(prompts, responses):
            raise RuntimeError("the verifier is down")
    """))
    monkeypatch.syspath_prepend(str(folder))
    yield folder


def ppo_args(workspace, out, *extra):
    return ["ppo", "--policy", str(workspace / "lm"), "--prompts", str(workspace / "prompts.jsonl"),
            "--prompts_per_iteration", "4", "--iterations", "3", "--max_new_tokens", "4", "--mini_batch_size", "4",
            "--save_every", "0", "--device", "cpu", "--out", str(out), *extra]


def test_reward_model_and_functions_combine_with_weights(workspace, reward_module, tmp_path, capsys):
    out = tmp_path / "run"
    args = ppo_args(workspace, out, "--reward_model", str(workspace / "rm"),
                    "--reward_funcs", f"{MODULE}:length,{MODULE}:async_a_count", "--reward_weights", "0.5,2,-1",
                    "--eval_prompts", str(workspace / "prompts.jsonl"), "--eval_every", "2")
    assert cli.main(args) == 0, capsys.readouterr().err
    records = rows(out, "ppo")
    steps = [r for r in records if r["step"] >= 1]
    assert len(steps) == 3
    for row in steps:
        expected = 0.5 * row["reward/model_mean"] + 2 * row["reward/length_mean"] - row["reward/async_a_count_mean"]
        assert row["reward/score_mean"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        for key in ("response/length_ratio", "response/truncated_fraction", "rollout/entropy",
                    "response/ref_length_ess", "policy/entropy"):
            assert math.isfinite(row[key]), key
    # the KL's growth from the second iteration on; the held-out gap where the probe ran (iterations 2 and 3)
    assert "kl/growth" not in steps[0]
    assert steps[1]["kl/growth"] == pytest.approx(steps[1]["kl/k1"] - steps[0]["kl/k1"], rel=1e-6, abs=1e-9)
    for row in steps[1:]:
        assert row["probe/reward_gap"] == pytest.approx(row["reward/score_mean"] - row["probe/reward"])
    assert "ppo: reward = 0.5 x model + 2 x length + -1 x async_a_count" in (out / "log.txt").read_text()


def test_functions_only_with_a_critic_from_the_policy(workspace, reward_module, tmp_path, capsys):
    import rewards_for_tests

    out = tmp_path / "run"
    args = ppo_args(workspace, out, "--reward_funcs", "rlhf_engine.pipeline.task:gold_reward," + f"{MODULE}:length",
                    "--reward_weights", "1,0", "--critic_init", "policy")
    assert cli.main(args) == 0, capsys.readouterr().err
    steps = rows(out, "ppo")
    assert all("reward/model_mean" not in r and r["reward/score_mean"] == pytest.approx(r["reward/gold_reward_mean"])
               for r in steps)
    # the functions read the prompts as written in the prompts file
    prompts = {json.loads(line)["prompt"] for line in (workspace / "prompts.jsonl").read_text().splitlines()}
    assert rewards_for_tests.CALLS and all(set(batch) <= prompts for batch in rewards_for_tests.CALLS)


def test_a_raising_function_skips_updates_and_the_run_continues(workspace, reward_module, tmp_path, capsys):
    out = tmp_path / "run"
    args = ppo_args(workspace, out, "--reward_model", str(workspace / "rm"), "--reward_funcs", f"{MODULE}:broken")
    with pytest.warns(UserWarning, match="'broken' raised RuntimeError: the verifier is down") as caught:
        assert cli.main(args) == 0
    assert sum("'broken'" in str(w.message) for w in caught) == 1  # once, not every iteration
    result = json.loads(capsys.readouterr().out)
    assert result["iterations"] == 3
    steps = rows(out, "ppo")
    assert [r["updates/skipped"] for r in steps] == [1, 1, 1] and steps[-1]["updates/skipped_total"] == 3
    log = (out / "log.txt").read_text()
    assert log.count("reward source broken (the reward model is 'model') failed") == 3


@pytest.mark.parametrize("extra, message", [
    (["--reward_funcs", "no_such_module_xyz:f", "--reward_model", "RM"], "--reward_funcs no_such_module_xyz:f: "
                                                                         "ModuleNotFoundError"),
    (["--reward_funcs", f"{MODULE}:missing", "--reward_model", "RM"], "AttributeError"),
    (["--reward_funcs", "justaname", "--reward_model", "RM"], "each entry is 'module:function'"),
    (["--reward_funcs", f"{MODULE}:length,{MODULE}:length", "--reward_model", "RM"], "two functions 'length'"),
    (["--reward_funcs", f"{MODULE}:length", "--reward_model", "RM", "--reward_weights", "1"],
     "give 2 finite numbers, one per reward source in order \\(model, length\\)"),
    (["--reward_funcs", f"{MODULE}:length", "--reward_weights", "x"], "must be comma-separated numbers"),
    (["--reward_funcs", f"{MODULE}:length"], "no --reward_model to start the critic from"),
    ([], "--reward_model or --reward_funcs"),
])
def test_bad_reward_options_are_refused_before_the_run(workspace, reward_module, tmp_path, capsys, extra, message):
    extra = [str(workspace / "rm") if e == "RM" else e for e in extra]
    out = tmp_path / "run"
    assert cli.main(ppo_args(workspace, out, *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_gold_reward_reads_task_prompts():
    assert task.gold_reward(["reverse: abc", "count a: aba"], ["cba", "1"]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="not a task prompt"):
        task.gold_reward(["hello"], ["x"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        task.gold_reward(["reverse: abc", "sort: ba"], ["cba"])


def test_quick_pipeline_against_the_gold_reward(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pipeline", "--quick", "--reward", "gold", "--nokl_iterations", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    gold_rows = [r for r in rows(out, "ppo_gold") if r["step"] >= 1]
    assert gold_rows and all(r["reward/score_mean"] == pytest.approx(r["reward/gold_mean"]) for r in gold_rows)
    assert "probe/reward_gap" in gold_rows[-1]
    summary = json.loads((out / "summary.json").read_text())
    gold = summary["gold_reward"]
    assert 0 <= gold["win_rate_ci_low"] <= gold["win_rate"] <= gold["win_rate_ci_high"] <= 1
    assert set(gold["model_run"]) >= {"gold_start", "gold_end"}
    text = (out / "report.md").read_text()
    assert "## PPO against the gold reward" in text and "](gold_reward.png)" in text
    assert (out / "gold_reward.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval_gold" / "responses.jsonl").is_file()


def test_pipeline_refuses_an_unknown_reward(tmp_path, capsys):
    assert cli.main(["pipeline", "--quick", "--reward", "judge", "--out", str(tmp_path / "run")]) == 2
    assert "reward must be one of ('model', 'gold')" in capsys.readouterr().err
