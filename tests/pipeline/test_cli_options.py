"""Every option with a constrained domain is refused when the command's
options are built: exit status 2, one line on stderr naming the option and
what it accepts, no traceback, no run folder and no model loaded. The few
checks that need the data tokenized (a length policy that drops every
example) or the file system (a run folder that cannot be written) end the
same way before any training. Also: the warning of a PPO iteration whose
updates were skipped, and the tokenizer's training on a 1 MB word."""
import errno
import json
import re

import pytest
import torch
from torch import nn

from rlhf_engine import cli
from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.models.builders import build_policy
from rlhf_engine.models.tokenizer import MAX_WORD_CHARS, byte_tokenizer, training_texts
from rlhf_engine.pipeline import builtin, evaluate, ppo_stage, run as run_module, sft
from rlhf_engine.pipeline.data import Demonstration, LengthPolicyError, encode_record, fit_examples, write_jsonl
from rlhf_engine.pipeline.ppo_stage import PPOStageConfig, train_ppo
from rlhf_engine.pipeline.run import LOG_FILE, Run

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
MODEL_LOADERS = ("load_causal_lm", "load_reward_model", "build_policy")


@pytest.fixture(scope="module")
def files(workspace):
    """The workspace, prompts that are not the built-in task's, and a regular file."""
    (workspace / "other_prompts.jsonl").write_text('{"prompt": "upper: abc"}\n{"prompt": "Write a haiku."}\n')
    (workspace / "a_file").write_text("not a folder\n")
    return workspace


def command_line(root, command, *extra):
    """``command``'s smallest valid command line on the workspace ``root``, then ``extra``."""
    base = {
        "sft": ["--model", root / "lm", "--train_file", root / "demos.jsonl"],
        "rm": ["--model", root / "lm", "--rankings", root / "rankings.jsonl", "--demonstrations",
               root / "demos.jsonl"],
        "ppo": ["--policy", root / "lm", "--reward_model", root / "rm", "--prompts", root / "prompts.jsonl",
                "--device", "cpu"],
        "eval": ["--policy_a", root / "lm", "--policy_b", root / "lm", "--prompts", root / "prompts.jsonl"],
        "pipeline": ["--quick"],
        "bench": ["ppo"],
    }[command]
    return [command, *map(str, base), *(str(a).format(root=root) for a in extra)]


# (command, extra flags, what the message must name); a flag's value may name a workspace file as {root}/...
ROWS = [
    # the list: options that used to fail after the work started
    ("ppo", ["--temperature", "0"], "temperature"),
    ("ppo", ["--kl_coef", "nan"], "kl_coef"),
    ("ppo", ["--clip_low", "-0.5"], "clip_low"),
    ("ppo", ["--gamma", "2"], "gamma"),
    ("ppo", ["--lam", "-1"], "lam"),
    ("ppo", ["--dual_clip", "0.5"], "dual_clip"),
    ("ppo", ["--max_grad_norm", "0"], "max_grad_norm"),
    pytest.param("ppo", ["--device", "cuda"], "device", marks=NO_CUDA),
    ("ppo", ["--device", "tpu7"], "device"),
    ("ppo", ["--offload_policy", "bogus=all"], "offload_policy"),
    ("ppo", ["--offload", "--offload_policy", "bogus=all"], "offload_policy"),
    ("sft", ["--vocab_size", "10"], "vocab_size"),
    ("sft", ["--model", "tiny", "--vocab_size", "258"], "vocab_size"),
    ("eval", ["--batch_size", "0"], "batch_size"),
    ("eval", ["--temperature", "-1"], "temperature"),
    ("eval", ["--prompts", "{root}/other_prompts.jsonl"], "--judge gold"),
    ("ppo", ["--eval_prompts", "{root}/other_prompts.jsonl", "--gold_judge"], "--gold_judge"),
    ("ppo", ["--gold_judge"], "--gold_judge"),  # no --eval_prompts: nothing for the gold judge to score
    # every command's other options with a constrained domain
    ("sft", ["--model_seed", "-1"], "model_seed"),
    ("sft", ["--device", "tpu7"], "device"),
    pytest.param("sft", ["--device", "cuda"], "device", marks=NO_CUDA),
    ("sft", ["--model", "{root}/no_such_folder"], "--model"),
    ("sft", ["--max_length", "1"], "max_length"),
    ("sft", ["--length_policy", "cut"], "length_policy"),
    ("sft", ["--batch_size", "0"], "batch_size"),
    ("sft", ["--epochs", "0"], "epochs"),
    ("sft", ["--max_steps", "-1"], "max_steps"),
    ("sft", ["--lr", "0"], "lr"),
    ("sft", ["--warmup_ratio", "1"], "warmup_ratio"),
    ("sft", ["--eval_fraction", "1"], "eval_fraction"),
    ("sft", ["--eval_every", "-1"], "eval_every"),
    ("sft", ["--save_every", "-1"], "save_every"),
    ("sft", ["--max_grad_norm", "inf"], "max_grad_norm"),
    ("sft", ["--batch_size", "abc"], "--batch_size"),  # argparse's own refusal: one line too, not the usage
    ("ppo", ["--max_grad_norm", "off"], "--max_grad_norm"),
    ("sft", ["--weight_decay", "-0.1"], "weight_decay"),
    ("sft", ["--seed", "-1"], "seed"),
    ("sft", ["--threads", "-1"], "threads"),
    ("sft", ["--dist_timeout", "0"], "dist_timeout"),
    ("rm", ["--model_seed", "-1"], "model_seed"),
    ("rm", ["--device", "tpu7"], "device"),
    ("rm", ["--batch_size", "0"], "batch_size"),
    ("rm", ["--normalize_rewards", "true", "--demonstrations", ""], "--demonstrations"),
    ("ppo", ["--prompts_per_iteration", "0"], "prompts_per_iteration"),
    ("ppo", ["--iterations", "-1"], "iterations"),
    ("ppo", ["--eval_every", "-1"], "eval_every"),
    ("ppo", ["--save_every", "-1"], "save_every"),
    ("ppo", ["--ptx_rows_per_step", "-1"], "ptx_rows_per_step"),
    ("ppo", ["--ptx_max_length", "1"], "ptx_max_length"),
    ("ppo", ["--ptx_length_policy", "cut"], "ptx_length_policy"),
    ("ppo", ["--max_new_tokens", "0"], "max_new_tokens"),
    ("ppo", ["--mini_batch_size", "0"], "mini_batch_size"),
    ("ppo", ["--top_p", "0"], "top_p"),
    ("ppo", ["--seed", "-1"], "seed"),
    ("ppo", ["--reward_model", "{root}/no_such_folder"], "--reward_model"),
    ("ppo", ["--critic", "{root}/no_such_folder"], "--critic"),
    ("eval", ["--temperature", "nan"], "temperature"),
    ("eval", ["--max_new_tokens", "0"], "max_new_tokens"),
    ("eval", ["--seed", "-1"], "seed"),
    ("eval", ["--device", "tpu7"], "device"),
    ("eval", ["--judge", "{root}/no_such_folder"], "--judge"),
    ("eval", ["--policy_b", "{root}/no_such_folder"], "--policy_b"),
    ("pipeline", ["--vocab_size", "10"], "vocab_size"),
    ("pipeline", ["--demo_noise", "2"], "demo_noise"),
    ("pipeline", ["--demonstrations", "1"], "demonstrations"),
    ("pipeline", ["--ranking_size", "1"], "ranking_size"),
    ("pipeline", ["--policy_size", "huge"], "policy_size"),
    ("pipeline", ["--eval_batch_size", "0"], "eval_batch_size"),
    ("pipeline", ["--kl_bound", "-1"], "kl_bound"),
    ("pipeline", ["--sft_batch_size", "0"], "sft_batch_size"),
    ("pipeline", ["--rm_lr", "0"], "rm_lr"),
    ("pipeline", ["--ppo_prompts_per_iteration", "0"], "ppo_prompts_per_iteration"),
    ("pipeline", ["--ppo_temperature", "0"], "ppo_temperature"),
    ("pipeline", ["--ppo_device", "tpu7"], "ppo_device"),
    pytest.param("pipeline", ["--ppo_device", "cuda"], "ppo_device", marks=NO_CUDA),
    ("bench", ["--iterations", "0"], "--iterations"),
    ("bench", ["--warmup", "-1"], "--warmup"),
    ("bench", ["--json", "{root}/a_file/report.json"], "--json"),
    # the environment: a run folder that cannot be created
    ("sft", ["--out", "{root}/a_file/run"], "--out"),
    ("ppo", ["--out", "{root}/a_file"], "--out"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model loaded or built (or a bench run) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (run_module, ppo_stage, builtin):
        for name in MODEL_LOADERS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr("rlhf_engine.bench.run_ppo_bench", refuse)


def error_lines(err: str):
    """stderr's lines other than the run's log lines (``HH:MM:SS message``) and progress bars."""
    return [line for line in err.splitlines()
            if line.strip() and not re.match(r"\d\d:\d\d:\d\d |[\w ]+: +\d+%\|", line)]


def run_cli(argv) -> int:
    """``rlhf-engine ARGV`` in this process: its exit status."""
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's refusals
        return exc.code


def assert_one_line_error(command, status, err, option):
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rlhf-engine {command}: error: "), lines[0]
    assert option in lines[0], lines[0]


@pytest.mark.parametrize("command, extra, option", ROWS)
def test_a_bad_option_is_one_line_exit_2_before_anything_runs(files, tmp_path, capsys, no_model_loads, command,
                                                              extra, option):
    argv = command_line(files, command, *extra)
    if command != "bench" and "--out" not in extra:
        argv += ["--out", str(tmp_path / "run")]
    status = run_cli(argv)
    captured = capsys.readouterr()
    assert_one_line_error(command, status, captured.err, option)
    assert not captured.out
    assert not (tmp_path / "run").exists()  # refused before the run folder opens


def test_the_one_line_names_what_the_option_accepts(files, tmp_path, capsys):
    for extra, accepted in ((["--batch_size", "0"], "an int >= 1, got 0"),
                            (["--temperature", "-1"], "a finite number >= 0 (0: greedy), got -1.0")):
        assert cli.main(command_line(files, "eval", *extra) + ["--out", str(tmp_path / "run")]) == 2
        assert accepted in capsys.readouterr().err
    assert cli.main(command_line(files, "sft", "--vocab_size", "10") + ["--out", str(tmp_path / "run")]) == 2
    assert "vocab_size must be an int >= 259" in capsys.readouterr().err
    assert cli.main(command_line(files, "eval", "--prompts", files / "other_prompts.jsonl") +
                    ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err  # the first prompt is the task's: line 2 is named
    assert f"{files / 'other_prompts.jsonl'}, line 2, field 'prompt': 'Write a haiku.' is not a prompt of the " \
           f"built-in task" in err and "give --judge RM_DIR" in err


def test_the_gold_judge_takes_the_task_prompts(files, tmp_path, capsys, monkeypatch):
    """Prompts of the built-in task pass the check (the run then goes on to load the models)."""
    loaded = []

    def stop(*args, **kwargs):
        loaded.append(args)
        raise run_module.UsageError("stopped here")

    monkeypatch.setattr(evaluate, "load_causal_lm", stop)  # the eval command's loader
    assert cli.main(command_line(files, "eval") + ["--out", str(tmp_path / "run")]) == 2
    assert loaded and "stopped here" in capsys.readouterr().err


# (command, extra flags, what the message must name, the stage) of checks that need the data tokenized: a model may
# be built (the tokenizer of `--model tiny` is learnt from the data), but no training starts and the stage writes
# no model folder and no checkpoint
LENGTH_ROWS = [
    ("sft", ["--max_length", "4", "--length_policy", "drop"], ("--length_policy", "--max_length 4"), "sft"),
    ("sft", ["--model", "tiny", "--max_length", "4", "--length_policy", "drop"], ("--length_policy", "max_length=4"),
     "sft"),
    ("rm", ["--max_length", "3", "--length_policy", "drop"], ("--length_policy", "--max_length 3"), "rm"),
    ("ppo", ["--ptx_coef", "0.5", "--ptx_data", "{root}/demos.jsonl", "--ptx_max_length", "4",
             "--ptx_length_policy", "drop"], ("--ptx_length_policy", "--ptx_max_length 4"), "ppo"),
    ("pipeline", ["--sft_max_length", "4", "--sft_length_policy", "drop"], ("--sft_length_policy",
                                                                            "--sft_max_length 4"), "sft"),
    ("pipeline", ["--rm_max_length", "4", "--rm_length_policy", "drop"], ("--rm_length_policy", "--rm_max_length 4"),
     "rm"),
]


@pytest.mark.parametrize("command, extra, names, stage", LENGTH_ROWS)
def test_a_length_policy_that_drops_every_example_is_one_line_exit_2_before_training(
        files, tmp_path, capsys, monkeypatch, command, extra, names, stage):
    def refuse(*args, **kwargs):
        raise AssertionError("training started, or the PPO models loaded")

    monkeypatch.setattr(sft, "train_loop", refuse)
    monkeypatch.setattr("rlhf_engine.pipeline.reward.train_loop", refuse)
    monkeypatch.setattr(ppo_stage, "load_causal_lm", refuse)  # ppo: the PPO-ptx data is checked before the models
    train_stage = builtin.train_stage

    def untrained_sft(run, stage_, model, tokenizer, *args, **kwargs):
        """The pipeline's SFT stage done without training (so that its RM stage starts)."""
        if stage_ != "sft":
            return train_stage(run, stage_, model, tokenizer, *args, **kwargs)
        run.save_model(stage_, model, tokenizer)
        return run.finish(stage_, {"steps": 0})

    if command == "pipeline" and stage == "rm":
        monkeypatch.setattr(builtin, "train_stage", untrained_sft)
    out = tmp_path / "run"
    status = cli.main(command_line(files, command, *extra) + ["--out", str(out)])
    err = capsys.readouterr().err
    for name in names:
        assert_one_line_error(command, status, err, name)
    assert "drops every example" in err and "truncate" in err
    assert not (out / stage / "model").exists()
    assert not (out / stage / "checkpoints").exists() or not any((out / stage / "checkpoints").iterdir())


def test_length_policy_error_names_the_options_of_its_stage():
    tok = byte_tokenizer(vocab_size=300)
    examples = [encode_record(tok, Demonstration("reverse: abc", "cba"))]
    assert fit_examples(examples, 64, "drop")[1].kept == 1
    with pytest.raises(LengthPolicyError, match=r"--length_policy drop drops every example: all 1 examples are "
                                                r"longer than max_length=4 tokens"):
        fit_examples(examples, 4, "drop")
    with pytest.raises(ValueError, match="raise --ptx_max_length or use --ptx_length_policy truncate"):
        fit_examples(examples, 4, "drop", option_prefix="ptx_")
    assert fit_examples([], 4, "drop")[0] == []  # nothing to drop is not an error


def test_a_run_folder_that_cannot_be_written_is_one_line(files, tmp_path, capsys, monkeypatch, no_model_loads):
    """A folder the precheck passes but that fails when the run opens it
    (e.g. a full disk, or permissions the precheck cannot see): one line,
    no traceback, status 2."""
    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "_write_json", full_disk)
    status = cli.main(command_line(files, "eval") + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert_one_line_error("eval", status, err, "--out")
    assert "No space left on device" in err and "config.json" in err
    # the precheck: a folder that is not writable (root is not refused by the permission bits: ask os.access)
    real_access = cli.os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: path != tmp_path and real_access(path, mode))
    status = cli.main(command_line(files, "sft") + ["--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert_one_line_error("sft", status, err, "--out")
    assert "is not writable (permission denied)" in err and not (tmp_path / "other").exists()


# -- a PPO iteration whose updates are all skipped ------------------------------------------------------------


class NaNReward(nn.Module):
    """A reward model that scores every response NaN."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return torch.full((input_ids.shape[0],), float("nan"))


def test_ppo_logs_a_warning_for_each_iteration_with_skipped_updates(tmp_path):
    tok = byte_tokenizer(vocab_size=300)
    config = EngineConfig(device="cpu", max_new_tokens=3, mini_batch_size=2, ppo_epochs=1, critic_init="policy",
                          seed=0)
    engine = RLHFEngine(build_policy("tiny", tok, num_hidden_layers=1), tok, config, reward_model=NaNReward())
    prompts = [tok(p)["input_ids"] for p in ("reverse: abc", "sort: cab", "upper: bad", "count a: aba")]
    with Run(tmp_path, "ppo", {}, progress=False) as run:
        result = train_ppo(run, "ppo", engine, prompts, PPOStageConfig(prompts_per_iteration=4, iterations=2,
                                                                       save_every=0, eval_every=0))
    assert result["iterations"] == 2 and result["score_mean"] is None  # NaN, written as null
    warnings = [line for line in (tmp_path / LOG_FILE).read_text().splitlines() if " ppo: warning: " in line]
    assert len(warnings) == 2, warnings
    for iteration, line in enumerate(warnings, start=1):
        assert f"ppo: warning: iteration {iteration} skipped 2 of its 2 updates" in line
        assert "not finite" in line and "reward/score_mean is nan" in line and "did not move" in line
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["updates/skipped"] for row in rows] == [2, 2]


def test_skipped_updates_warning_names_other_non_finite_metrics():
    line = ppo_stage.skipped_updates_warning("ppo", 7, {"updates/skipped": 1, "updates/applied": 3,
                                                        "reward/score_mean": 0.5, "loss/policy": float("inf")})
    assert line.startswith("ppo: warning: iteration 7 skipped 1 of its 4 updates")
    assert "non-finite metrics: loss/policy" in line and "the other updates were applied" in line


# -- the tokenizer on a 1 MB word -------------------------------------------------------------------------------


def test_the_tokenizer_trainer_never_sees_a_long_word():
    """The BPE trainer's time grows with the square of a word's length: a
    1 MB line without a space reaches it as pieces of at most MAX_WORD_CHARS
    (bounded by construction), and ordinary text reaches it unchanged."""
    line = "abcdefghij" * 100_000 + " " * 1000 + "x"
    pieces = list(training_texts([line]))
    assert "".join(pieces) == line and max(len(piece) for piece in pieces) <= MAX_WORD_CHARS
    assert max(len(run) for piece in pieces for run in re.findall(r"\S+|\s+", piece)) <= MAX_WORD_CHARS
    ordinary = ["reverse: abc", "hello world " * 50, "x" * (MAX_WORD_CHARS - 1)]
    assert list(training_texts(ordinary)) == ordinary
    tok = byte_tokenizer([line, "reverse: abc"], vocab_size=300)  # about a second (it took minutes)
    assert tok.decode(tok("abcdefghij" * 30)["input_ids"]) == "abcdefghij" * 30
    with pytest.raises(ValueError, match="max_word_chars"):
        list(training_texts(["x"], 0))


def test_sft_tiny_on_a_1mb_line(tmp_path, capsys):
    demos = [Demonstration("reverse: abc", "ab" * 500_000)] + [Demonstration("reverse: abc", "cba")] * 3
    write_jsonl(tmp_path / "demos.jsonl", demos)
    assert cli.main(["sft", "--model", "tiny", "--train_file", str(tmp_path / "demos.jsonl"), "--max_steps", "1",
                     "--batch_size", "2", "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] >= 1
