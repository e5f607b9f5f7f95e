"""The rlhf-engine command: help for every command, option precedence, bad
data (exit 2, file/line/field, no traceback), Ctrl-C and --resume, and the
stage model folders read back by transformers."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine import cli
from rlhf_engine.models.scalar_heads import sequence_scores
from rlhf_engine.pipeline.config import RunOptions, SFTData, parse_command
from rlhf_engine.pipeline.sft import SFTConfig
from tests.helpers import assert_same_weights, interrupt_at, weights

SFT_TYPES = (RunOptions, SFTData, SFTConfig)


def read_json(path):
    return json.loads(open(path).read())


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_lists_every_option_with_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: one line per option
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    blocks = {}  # each option's lines: its flags, then its help (on the next line when the flags are long)
    for line in text.split("options:", 1)[1].splitlines():
        if line.strip().startswith("-"):
            current = line.split()[0]
            blocks[current] = line
        elif line.strip():
            blocks[current] += " " + line.strip()
    defaults = {}
    for cls in cli.COMMANDS[command].types():
        for field in dataclasses.fields(cls):
            defaults[field.name] = field.default
    defaults.update(cli.COMMANDS[command].defaults)
    for name, default in defaults.items():
        assert f"--{name}" in blocks, f"--{name} missing from `{command} --help`"
        assert f"(default: {default})" in blocks[f"--{name}"], blocks[f"--{name}"]
    assert "--config FILE" in text


def test_top_level_help_and_bench_unchanged(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("sft", "rm", "ppo", "pipeline", "eval", "bench"):
        assert command in text
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--iterations ITERATIONS" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["bench", "ppo", "--size", "small", "--iterations", "2"])
    assert (args.work, args.size, args.iterations, args.warmup, args.json) == ("ppo", "small", 2, 1, None)


def test_config_file_then_flags_win(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 1e-2\nbatch_size: 7\nmodel_seed: 3\npacking: false\n")
    argv = ["--config", str(yaml_file), "--train_file", "d.jsonl", "--lr", "0.5"]
    (run, data, sft), resolved = parse_command(SFT_TYPES, argv, prog="t", description="t")
    assert sft.lr == 0.5 and sft.batch_size == 7 and sft.packing is False and data.model_seed == 3
    assert sft.max_steps == SFTConfig().max_steps
    assert resolved["lr"] == 0.5 and "config" not in resolved and "resume" not in resolved
    # command defaults < presets < file < flags
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"epochs": 4}))
    presets = {"fast": ("help", {"epochs": 2, "max_steps": 5, "seed": 9})}
    argv = ["--train_file", "d", "--fast", "--config", str(json_file), "--seed", "1"]
    (_, _, sft), _ = parse_command(SFT_TYPES, argv, prog="t", description="t",
                                   command_defaults={"max_steps": 3, "epochs": 8}, presets=presets)
    assert (sft.epochs, sft.max_steps, sft.seed) == (4, 5, 1)
    (_, _, sft), _ = parse_command(SFT_TYPES, ["--train_file", "d"], prog="t", description="t",
                                   command_defaults={"max_steps": 3}, presets=presets)
    assert (sft.max_steps, sft.seed) == (3, 0)


def test_optional_numbers_take_none_as_a_flag():
    """The help of an Optional number offers None ("None: off"): the flag takes it."""
    from rlhf_engine.engine import EngineConfig
    from rlhf_engine.pipeline.config import PPOData

    types = (RunOptions, PPOData, EngineConfig)
    base = ["--policy", "p", "--reward_model", "r", "--prompts", "q"]
    (_, _, engine), _ = parse_command(types, base + ["--max_grad_norm", "None", "--score_clip", "none"],
                                      prog="t", description="t")
    assert engine.max_grad_norm is None and engine.score_clip is None
    (_, _, engine), _ = parse_command(types, base + ["--max_grad_norm", "0.5"], prog="t", description="t")
    assert engine.max_grad_norm == 0.5
    with pytest.raises(SystemExit):
        parse_command(types, base + ["--max_grad_norm", "off"], prog="t", description="t")


def test_resume_reads_the_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train_file": "x.jsonl", "lr": 0.25, "out": str(tmp_path)}))
    (_, data, sft), _ = parse_command(SFT_TYPES, ["--out", str(tmp_path), "--resume"], prog="t", description="t")
    assert data.train_file == "x.jsonl" and sft.lr == 0.25
    (_, _, sft), _ = parse_command(SFT_TYPES, ["--out", str(tmp_path), "--resume", "--lr", "1"], prog="t",
                                   description="t")
    assert sft.lr == 1.0


@pytest.mark.parametrize("content, problem", [("lr: [1\n", "not valid YAML"), ("bogus: 1\n", "unknown option 'bogus'"),
                                              ("- 1\n", "expected a mapping")])
def test_bad_config_file_exits_2(tmp_path, capsys, content, problem):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert cli.main(["sft", "--config", str(path), "--train_file", "d", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err and "Traceback" not in err


def test_bad_option_value_exits_2(tmp_path, capsys):
    assert cli.main(["sft", "--train_file", "d", "--batch_size", "0", "--out", str(tmp_path / "o")]) == 2
    assert "batch_size must be an int >= 1" in capsys.readouterr().err
    assert cli.main(["sft", "--out", str(tmp_path / "o")]) == 2
    assert "--train_file is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, flag, kind, line, field", [
    ("sft", "--train_file", '{"prompt": "sort: ab", "response": "ab"}\n{"prompt": "sort: ba"}\n', 2, "response"),
    ("rm", "--comparisons", '{"prompt": "sort: ab", "chosen": "ab", "rejected": "ab "}\n', 1, "rejected"),
    ("rm", "--rankings", '{"prompt": "p", "responses": ["a", 3]}\n', 1, "responses[1]"),
    ("ppo", "--prompts", '{"prompt": "a"}\n\n{"prompt": 7}\n', 3, "prompt"),
])
def test_bad_data_exits_2_naming_file_line_and_field(workspace, tmp_path, capsys, command, flag, kind, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(kind)
    models = {"sft": [], "rm": ["--model", str(workspace / "lm"), "--demonstrations", str(workspace / "demos.jsonl")],
              "ppo": ["--policy", str(workspace / "lm"), "--reward_model", str(workspace / "rm")]}[command]
    status = cli.main([command, flag, str(path), *models, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{path}, line {line}, field '{field}'" in err, err
    assert "Traceback" not in err


def test_bad_data_through_python_m_has_no_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "sort: ab", "response": ""}\n')
    proc = subprocess.run([sys.executable, "-m", "rlhf_engine.cli", "sft", "--train_file", str(path), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{path}, line 1, field 'response': is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_ctrl_c_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(
        workspace, tmp_path, capsys, monkeypatch):
    args = ["sft", "--model", str(workspace / "lm"), "--train_file", str(workspace / "demos.jsonl"),
            "--max_steps", "6", "--batch_size", "4", "--eval_every", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "full")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 6 and result["model"] == str(tmp_path / "full" / "sft" / "model")

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        interrupt_at(patch, "sft", 3)
        assert cli.main(args + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"resume with: rlhf-engine sft --out {out} --resume" in err and "Traceback" not in err
    assert (out / "sft" / "checkpoints" / "step-00000003").is_dir() and not (out / "sft" / "model").exists()

    assert cli.main(["sft", "--out", str(out), "--resume"]) == 0  # options from the run's config.json
    steps = [row["step"] for row in map(json.loads, open(out / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_same_weights(weights(out / "sft" / "model"), weights(tmp_path / "full" / "sft" / "model"))
    assert read_json(out / "config.json") == read_json(tmp_path / "full" / "config.json") | {"out": str(out)}
    assert list((out / "tb").iterdir())


def test_rm_stage_folder_loads_in_transformers(workspace, tmp_path, capsys):
    out = tmp_path / "rm"
    assert cli.main(["rm", "--model", str(workspace / "lm"), "--rankings", str(workspace / "rankings.jsonl"),
                     "--demonstrations", str(workspace / "demos.jsonl"), "--max_steps", "2", "--batch_size", "4",
                     "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["eval_accuracy"] <= 1 and result["eval_examples"] == 1  # 5% of 12, at least one
    model = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    tok = AutoTokenizer.from_pretrained(out / "rm" / "model")
    ids = torch.tensor([tok("sort: ba\nAnswer:\nab")["input_ids"]])
    # transformers' own forward pools at the last token, as our scorer does on an unpadded row; our scorer then
    # subtracts the offset the stage measured on the demonstrations (config.score_offset)
    assert model(ids).logits.shape == (1, 1)
    torch.testing.assert_close(model(ids).logits[:, 0] - model.config.score_offset,
                               sequence_scores(model, ids, torch.ones_like(ids)))


def test_ppo_ctrl_c_and_resume_continue_exactly(workspace, tmp_path, capsys, monkeypatch):
    args = ["ppo", "--policy", str(workspace / "lm"), "--reward_model", str(workspace / "rm"),
            "--prompts", str(workspace / "prompts.jsonl"), "--eval_prompts", str(workspace / "prompts.jsonl"),
            "--gold_judge", "--prompts_per_iteration", "4", "--iterations", "4", "--eval_every", "2",
            "--max_new_tokens", "4", "--mini_batch_size", "2", "--lr", "1e-3", "--device", "cpu"]
    assert cli.main(args + ["--out", str(tmp_path / "full")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iterations"] == 4 and "probe/gold" in result and "probe/reward" in result

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        interrupt_at(patch, "ppo", 2)
        assert cli.main(args + ["--out", str(out)]) == 130
    assert f"rlhf-engine ppo --out {out} --resume" in capsys.readouterr().err
    assert cli.main(["ppo", "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert_same_weights(weights(out / "ppo" / "model"), weights(tmp_path / "full" / "ppo" / "model"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]  # step 0: the probe of the starting policy
    full = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [row["reward/score_mean"] for row in rows[1:]] == [row["reward/score_mean"] for row in full[1:]]


def test_eval_command(workspace, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["eval", "--policy_a", str(workspace / "lm"), "--policy_b", str(workspace / "lm"), "--prompts",
              str(workspace / "prompts.jsonl"), "--max_new_tokens", "4"]
    assert cli.main(common + ["--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    # the same policy sampled with the same seed: every prompt a tie
    assert (result["win_rate"], result["ties"], result["n"]) == (0.5, 12, 12)
    assert len(open(out / "eval" / "responses.jsonl").readlines()) == 12
    assert cli.main(common + ["--judge", str(workspace / "rm"), "--out", str(tmp_path / "eval_rm")]) == 0
    assert json.loads(capsys.readouterr().out)["judge"] == str(workspace / "rm")
    assert cli.main(common + ["--judge", str(tmp_path / "nothing"), "--out", str(tmp_path / "e3")]) == 2
    assert "no such model folder" in capsys.readouterr().err
