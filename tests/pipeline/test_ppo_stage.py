"""The PPO stage: PPO-ptx from the command line (the SFT demonstrations reach
every optimizer step, each step its own rows, and move the weights by what
the LM loss says; refused without data or without a coefficient; resumed
exactly), and the policy probe run with its models on the compute device
(the engine's score placement, which matters with offload)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf_engine import cli, distributed
from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.engine.offload import Placement, plan
from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline import builtin, ppo_stage
from rlhf_engine.pipeline.data import Demonstration, encode_pair, read_jsonl
from rlhf_engine.pipeline.ppo_stage import PolicyProbe, ptx_batches
from rlhf_engine.pipeline.report import read_metrics
from rlhf_engine.pipeline.sft import SFTConfig
from rlhf_engine.pipeline.training import split_and_prepare
from tests.helpers import interrupt_at, torchrun

PTX_COEF, LR = 0.5, 0.05


@pytest.fixture(scope="module")
def ptx_workspace(workspace):
    """test_cli's workspace (demonstrations, prompts, a tiny SFT model) and a
    reward model that scores every response 0 (its head is zero): with group
    baselines every advantage is then exactly 0, so the policy-gradient loss
    moves nothing and PPO-ptx alone trains the policy."""
    rm = reward_model_from_causal_lm(AutoModelForCausalLM.from_pretrained(workspace / "lm"))
    with torch.no_grad():
        rm.score.weight.zero_()
    rm.save_pretrained(workspace / "rm0")
    byte_tokenizer().save_pretrained(workspace / "rm0")
    return workspace


def ppo_args(root, *extra):
    return ["ppo", "--policy", str(root / "lm"), "--reward_model", str(root / "rm0"), "--prompts",
            str(root / "prompts.jsonl"), "--device", "cpu", "--max_new_tokens", "3", "--save_every", "0",
            "--eval_every", "0", *map(str, extra)]


# 4 prompts x 2 samples, mini-batches of 4, 2 epochs: 4 optimizer steps per iteration, 2 PPO-ptx rows each.
PTX_RUN = ("--ptx_data", "{demos}", "--ptx_coef", PTX_COEF, "--ptx_rows_per_step", 2, "--advantage_estimator",
           "group", "--samples_per_prompt", 2, "--prompts_per_iteration", 4, "--mini_batch_size", 4, "--ppo_epochs",
           2, "--iterations", 2, "--kl_coef", 0, "--lr", LR, "--adam_eps", 1.0, "--max_grad_norm", 1e6)
STEPS_PER_ITERATION, ROWS_PER_STEP = 4, 2


def ptx_run_args(root):
    return ppo_args(root, *(str(a).format(demos=root / "demos.jsonl") for a in PTX_RUN))


class PtxSpy:
    """Records the PPO-ptx rows of every optimizer step (the engine's
    ``_ptx_step``), as ``(prompt_ids, response_ids)`` tuples: the real
    tokens of each row split at its loss mask."""

    def __init__(self, patch):
        self.steps = []
        original = RLHFEngine._ptx_step

        def spy(engine, ptx_batch, micro):
            self.steps.append([self._row(*row) for row in zip(*ptx_batch)])
            return original(engine, ptx_batch, micro)

        patch.setattr(RLHFEngine, "_ptx_step", spy)

    @staticmethod
    def _row(ids, attention, loss_mask):
        real = attention.bool()
        tokens, targets = ids[real].tolist(), loss_mask[real].tolist()
        cut = targets.index(True)
        assert targets == [False] * cut + [True] * (len(targets) - cut), "the loss is on the response tokens only"
        return tuple(tokens[:cut]), tuple(tokens[cut:])


@pytest.fixture(scope="module")
def ptx_run(ptx_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "run"
    with pytest.MonkeyPatch.context() as patch:
        spy = PtxSpy(patch)
        status = cli.main(ptx_run_args(ptx_workspace) + ["--out", str(out)])
    assert status == 0
    return out, spy.steps


def response_nll(model, rows):
    """Summed -log p of the response tokens of ``rows`` (each run alone,
    unpadded), and their count: the SFT loss, computed independently."""
    total, count = 0.0, 0
    for prompt, response in rows:
        ids = torch.tensor([list(prompt) + list(response)])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        token_logp = logp.gather(-1, targets[:, None])[:, 0]
        total = total - token_logp[len(prompt) - 1:].sum()
        count += len(response)
    return total, count


def replay(root, steps, coef):
    """The SFT model after one AdamW step per entry of ``steps`` on
    ``coef x`` the mean response-token NLL of that step's rows, with the
    engine's optimizer settings; and each step's loss before its update."""
    model = AutoModelForCausalLM.from_pretrained(root / "lm")
    model.train()
    cfg = EngineConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1.0,
                                  weight_decay=cfg.weight_decay)
    losses = []
    for rows in steps:
        nll, count = response_nll(model, rows)
        (coef * nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(nll.item() / count)
    return model.state_dict(), losses


def flat_delta(state, start):
    return torch.cat([(state[k].float() - start[k].float()).flatten() for k in sorted(start)])


def test_ptx_from_the_cli_moves_the_weights_by_the_lm_loss_with_fresh_rows_per_step(ptx_workspace, ptx_run):
    out, steps = ptx_run
    tok = byte_tokenizer()
    demos = read_jsonl(ptx_workspace / "demos.jsonl", "demonstrations")
    encoded = {tuple(map(tuple, encode_pair(tok, d.prompt, d.response))) for d in demos}

    # every optimizer step trained on its own rows_per_step SFT-encoded demonstrations
    assert len(steps) == 2 * STEPS_PER_ITERATION and all(len(rows) == ROWS_PER_STEP for rows in steps)
    seen = [row for rows in steps for row in rows]
    assert set(seen) <= encoded
    assert len(set(seen)) == len(seen), "a demonstration reached two optimizer steps"

    # the weights moved by exactly the AdamW steps of ptx_coef x that LM loss (and nothing else)
    start = AutoModelForCausalLM.from_pretrained(ptx_workspace / "lm").state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model").state_dict()
    expected, losses = replay(ptx_workspace, steps, PTX_COEF)
    moved, wanted = flat_delta(trained, start), flat_delta(expected, start)
    assert wanted.norm() > 0
    assert (moved - wanted).norm() / wanted.norm() < 1e-3
    # ... which the coefficient and the rows each change by far more than that
    for other in (replay(ptx_workspace, steps, 2 * PTX_COEF)[0],
                  replay(ptx_workspace, [steps[0]] * len(steps), PTX_COEF)[0]):
        assert (moved - flat_delta(other, start)).norm() / wanted.norm() > 0.05

    # ptx/loss: the mean LM loss (per token) of each iteration's steps
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for iteration, row in enumerate(rows):
        mine = losses[iteration * STEPS_PER_ITERATION:(iteration + 1) * STEPS_PER_ITERATION]
        assert row["ptx/loss"] == pytest.approx(sum(mine) / len(mine), rel=1e-4)
    result = json.loads((out / "ppo" / "result.json").read_text())
    assert result["ptx_loss_mean"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_ptx_resume_continues_the_row_stream_exactly(ptx_workspace, ptx_run, tmp_path, capsys):
    full, full_steps = ptx_run
    out = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, "ppo", 1)
        spy = PtxSpy(patch)
        assert cli.main(ptx_run_args(ptx_workspace) + ["--out", str(out)]) == 130
        assert cli.main(["ppo", "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert spy.steps == full_steps
    trained, reference = (AutoModelForCausalLM.from_pretrained(p / "ppo" / "model").state_dict() for p in (out, full))
    for key in reference:
        assert torch.equal(trained[key], reference[key]), key


def test_ptx_over_two_ranks_trains_like_one_process(ptx_workspace, ptx_run, tmp_path):
    """Under torchrun each rank passes its share of every step's rows: the
    same LM losses and weights as the one-process run."""
    one, _ = ptx_run
    status, _, err = torchrun(ptx_run_args(ptx_workspace) + ["--threads", "1", "--out", str(tmp_path / "two")])
    assert status == 0, err[-3000:]
    for a, b in zip(*(read_metrics(folder) for folder in (one, tmp_path / "two")), strict=True):
        assert b["ptx/loss"] == pytest.approx(a["ptx/loss"], rel=1e-5)
    trained, reference = (AutoModelForCausalLM.from_pretrained(p / "ppo" / "model").state_dict()
                          for p in (tmp_path / "two", one))
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-4, atol=1e-6)


def test_ptx_batches_give_each_step_the_same_rows_at_any_world_size():
    rows = [([1, 2], [10 + i, 3]) for i in range(7)]
    per_rank = {}
    for world in (1, 2):
        batches = []
        for rank in range(world):
            stream = ptx_batches(rows, 0, updates=3, rows_per_step=2, seed=5,
                                 where=distributed.Layout(rank, world), start=1)
            batches.append(next(stream))
        # the engine's step j takes rows j::3 of each rank's batch; the step's global rows, in rank order
        per_rank[world] = [[ids[j::3, 2].tolist() for ids, _, _ in batches] for j in range(3)]
    steps = [sum(parts, []) for parts in per_rank[1]]
    assert [sum(parts, []) for parts in per_rank[2]] == steps
    # iteration 1 of the stream: its 6 rows follow iteration 0's 6 in one seeded pass over the 7 rows
    first = next(ptx_batches(rows, 0, updates=3, rows_per_step=2, seed=5))[0][:, 2]
    assert len(set(first.tolist()) | {r for step in steps for r in step}) == 7
    ids, attention, loss_mask = next(ptx_batches(rows, 0, updates=3, rows_per_step=2, seed=5))
    assert attention.sum(-1).tolist() == [4] * 6 and loss_mask[:, 2:].all() and not loss_mask[:, :2].any()


@pytest.mark.parametrize("extra, message", [
    (("--ptx_coef", "0.5"), "--ptx_coef 0.5 needs PPO-ptx data: give --ptx_data FILE"),
    (("--ptx_data", "{demos}"), "--ptx_data is given but --ptx_coef is 0"),
    (("--ptx_rows_per_step", "2"), "--ptx_rows_per_step is set but --ptx_coef is 0"),
    (("--ptx_max_length", "64"), "--ptx_max_length is set but --ptx_coef is 0"),
])
def test_ppo_refuses_ptx_options_that_do_nothing_before_loading_a_model(ptx_workspace, tmp_path, capsys, monkeypatch,
                                                                        extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ppo_stage, "load_causal_lm", no_loading)
    monkeypatch.setattr(ppo_stage, "load_reward_model", no_loading)
    extra = [a.format(demos=ptx_workspace / "demos.jsonl") for a in extra]
    assert cli.main(ppo_args(ptx_workspace, *extra) + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-engine ppo: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_pipeline_ptx_uses_the_sft_demonstrations_encoded_as_sft_does(tmp_path, capsys, monkeypatch):
    assert cli.main(["pipeline", "--quick", "--ppo_ptx_rows_per_step", "4", "--out", str(tmp_path / "r0")]) == 2
    assert "--ppo_ptx_rows_per_step is set but --ppo_ptx_coef is 0" in capsys.readouterr().err

    class Stop(Exception):
        pass

    calls = []

    def fake_train_ppo(run, stage, engine, prompt_ids, config, *, probe=None, ptx_rows=None):
        calls.append((stage, engine.config.ptx_coef, config.ptx_rows_per_step, ptx_rows))
        raise Stop

    train_stage = builtin.train_stage

    def sft_only(run, stage, model, tokenizer, *args, **kwargs):
        if stage != "sft":  # the reward model's training is not what this test is about
            run.save_model(stage, model, tokenizer)
            return {}
        return train_stage(run, stage, model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(builtin, "train_ppo", fake_train_ppo)
    monkeypatch.setattr(builtin, "train_stage", sft_only)
    out = tmp_path / "r1"
    with pytest.raises(Stop):
        cli.main(["pipeline", "--quick", "--ppo_ptx_coef", "0.25", "--ppo_ptx_rows_per_step", "4",
                  "--sft_max_length", "24", "--out", str(out)])
    [(stage, coef, per_step, ptx_rows)] = calls
    assert (stage, coef, per_step) == ("ppo", 0.25, 4)
    # the SFT stage's own training examples: its split of the demonstrations file, encoded with its length policy
    sft = SFTConfig(**{**builtin.SFT_DEFAULTS, "max_length": 24})  # --quick keeps the split's options
    examples, _, info = split_and_prepare(builtin.task_tokenizer(builtin.TaskConfig().vocab_size),
                                          read_jsonl(out / "data" / "demonstrations.jsonl", "demonstrations"), None,
                                          sft, (Demonstration,))
    assert info["truncated"] > 0 and info["eval_examples"] > 0
    assert ptx_rows == [(e.prompt_ids, e.responses[0]) for e in examples]


def test_probe_runs_with_its_models_on_the_compute_device(ptx_workspace, tmp_path, capsys, monkeypatch):
    """With offload on, a step ends in the learn placement (reference and
    reward model on the host); the probe must see them on the device."""
    where = {}  # module -> "device" or "host", as the last Placement.enter put it
    enter = Placement.enter

    def tracking_enter(self, phase):
        moved = enter(self, phase)
        on_device = plan(self.policy, phase)
        for item, module in self.modules.items():
            where[module] = "device" if on_device[item] else "host"
        return moved

    seen = []
    call = PolicyProbe.__call__

    def checking_call(self, policy):
        reward = self.judges["reward"].args[0]
        seen.append({name: where.get(model, "device")  # not placed yet: every model starts on the device
                     for name, model in (("policy", policy), ("reference", self.reference), ("reward", reward))})
        return call(self, policy)

    monkeypatch.setattr(Placement, "enter", tracking_enter)
    monkeypatch.setattr(PolicyProbe, "__call__", checking_call)
    args = ppo_args(ptx_workspace, "--offload", "--eval_prompts", ptx_workspace / "prompts.jsonl", "--eval_every", 1,
                    "--iterations", 2, "--prompts_per_iteration", 4, "--mini_batch_size", 4)
    assert cli.main(args + ["--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert len(seen) == 3  # the start, then after each iteration
    assert all(models == {"policy": "device", "reference": "device", "reward": "device"} for models in seen), seen


def test_probe_refuses_a_reference_on_another_device():
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).to("meta")
    probe = PolicyProbe(tok, ["sort: ba"], {}, reference, max_new_tokens=2)
    with pytest.raises(ValueError, match="different devices"):
        probe.sample(policy)


def test_probe_engine_enters_the_score_placement():
    phases = []

    class Engine:
        policy = "the policy"
        placement = type("P", (), {"enter": lambda self, phase: phases.append(phase)})()

    assert ppo_stage.probe_engine(Engine(), lambda policy: {"probe/x": float(len(phases)), "p": policy}) == \
        {"probe/x": 1.0, "p": "the policy"}
    assert phases == ["score"]
