"""``sft``, ``rm`` and ``ppo`` with ``--lora_r``: each stage's model folder
is a merged HuggingFace model and ``<stage>/adapter`` beside it loads with
peft on the base model, both giving the trained model's outputs; checkpoints
hold the adapters only, and a resumed LoRA run equals an uninterrupted one."""
import pytest
import torch

from rlhf_engine import cli
from rlhf_engine.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_engine.models import causal_lm_logprobs
from tests.helpers import assert_same_weights, cut, rows, sft_args, weights

peft = pytest.importorskip("peft")
LORA = ["--lora_r", "4", "--lora_alpha", "8"]


def sample_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    score = mask.clone()
    score[:, :4] = False
    return ids, mask, score


def assert_merged_and_adapter_agree(stage_dir, base_folder, trained_differs=True):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(stage_dir / "model").eval()
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder),
                                             stage_dir / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    ids, mask, score = sample_batch(merged.config.vocab_size)
    with torch.no_grad():
        want = causal_lm_logprobs(adapted, ids, mask, score)
        torch.testing.assert_close(causal_lm_logprobs(merged, ids, mask, score), want, rtol=1e-5, atol=1e-5)
        if trained_differs:
            assert not torch.allclose(causal_lm_logprobs(base, ids, mask, score), want)
    return merged, adapted


def test_sft_with_lora_writes_merged_and_adapter_folders(workspace, tmp_path):
    out = tmp_path / "sft"
    assert cli.main(sft_args(workspace) + LORA + ["--lr", "1e-2", "--out", str(out)]) == 0
    assert_merged_and_adapter_agree(out / "sft", workspace / "lm")
    tensors, _ = load_checkpoint(latest_checkpoint(out / "sft" / "checkpoints"))
    assert tensors["model"] and all("lora_" in key for key in tensors["model"])


def test_sft_with_lora_resumes_exactly(workspace, tmp_path, monkeypatch):
    full, cut_run = tmp_path / "full", tmp_path / "cut"
    args = sft_args(workspace) + LORA
    assert cli.main(args + ["--out", str(full)]) == 0
    cut(args, cut_run, monkeypatch, "sft", 3)
    assert cli.main(["sft", "--out", str(cut_run), "--resume"]) == 0
    assert_same_weights(weights(cut_run / "sft" / "model"), weights(full / "sft" / "model"))


def test_sft_with_lora_and_gradient_checkpointing(workspace, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    args = sft_args(workspace) + LORA
    assert cli.main(args + ["--out", str(plain)]) == 0
    assert cli.main(args + ["--gradient_checkpointing", "true", "--out", str(checkpointed)]) == 0
    want, got = weights(plain / "sft" / "model"), weights(checkpointed / "sft" / "model")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_rm_with_lora(workspace, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    args = ["rm", "--model", str(workspace / "lm"), "--rankings", str(workspace / "rankings.jsonl"),
            "--demonstrations", str(workspace / "demos.jsonl"), "--max_steps", "3", "--batch_size", "4",
            "--lr", "1e-2", *LORA, "--out", str(out)]
    assert cli.main(args) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model", num_labels=1).eval()
    base = AutoModelForSequenceClassification.from_pretrained(workspace / "lm", num_labels=1)
    adapted = peft.PeftModel.from_pretrained(base, out / "rm" / "adapter").eval()
    assert merged.config.score_offset is not None
    ids, _, _ = sample_batch(merged.config.vocab_size)
    with torch.no_grad():  # raw head outputs (the offset lives in the merged folder's config)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_ppo_with_lora(workspace, tmp_path):
    out = tmp_path / "ppo"
    args = ["ppo", "--policy", str(workspace / "lm"), "--reward_model", str(workspace / "rm"), "--prompts",
            str(workspace / "prompts.jsonl"), "--prompts_per_iteration", "4", "--iterations", "2",
            "--max_new_tokens", "4", "--mini_batch_size", "4", "--lr", "1e-2", "--critic_lr", "1e-2",
            "--save_every", "1", "--device", "cpu", "--eval_prompts", str(workspace / "prompts.jsonl"),
            "--eval_every", "1", *LORA, "--out", str(out)]
    assert cli.main(args) == 0
    probes = [row for row in rows(out, "ppo") if "probe/kl" in row]
    assert probes and probes[0]["probe/kl"] == 0.0  # the reference (adapters off) is the starting policy
    assert any(row["probe/kl"] != 0.0 for row in probes[1:])
    assert_merged_and_adapter_agree(out / "ppo", workspace / "lm")
    tensors, _ = load_checkpoint(latest_checkpoint(out / "ppo" / "checkpoints"))
    for name in ("policy", "critic"):
        assert all("lora_" in key or "modules_to_save" in key for key in tensors[name]), name


def test_lora_options_are_validated(workspace, tmp_path, capsys):
    assert cli.main(sft_args(workspace) + ["--lora_r", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "lora_r must be an int >= 0" in capsys.readouterr().err
    assert cli.main(sft_args(workspace) + ["--lora_dropout", "0.1", "--out", str(tmp_path / "y")]) == 2
    assert "no effect without lora_r" in capsys.readouterr().err


def test_pipeline_lora_applies_to_the_reward_model_and_ppo_with_higher_default_rates():
    from rlhf_engine.pipeline import builtin

    def configs(**task_and_stage):
        options = {cls: {} for cls in builtin.OPTION_TYPES}
        for name, value in task_and_stage.items():
            cls = next(c for c in builtin.OPTION_TYPES if name in c.__dataclass_fields__)
            options[cls][name] = value
        return builtin.stage_configs(*(cls(**options[cls]) for cls in builtin.OPTION_TYPES))

    plain, adapted = configs(), configs(lora_r=8)
    factor = builtin.LORA_LR_FACTOR
    assert adapted.sft == plain.sft and not adapted.sft.lora  # SFT trains the fresh policy in full
    assert adapted.rm.lora_r == adapted.engine.lora_r == 8
    assert adapted.rm.lr == plain.rm.lr * factor and adapted.engine.lr == plain.engine.lr * factor
    assert adapted.engine.critic_lr == plain.engine.critic_lr * factor
    assert adapted.task.nokl_lr == plain.task.nokl_lr * factor
    own = configs(lora_r=8, rm_lr=1e-3, ppo_lora_r=2)  # a stage's own options win
    assert own.rm.lr == 1e-3 and own.engine.lora_r == 2 and own.engine.lr == plain.engine.lr


def test_train_loop_refuses_lora_options_on_a_model_without_adapters():
    from rlhf_engine.pipeline.training import TrainConfig, train_loop
    from tests.helpers import linear_task

    model, step, evaluate = linear_task()
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        train_loop(model, TrainConfig(lora_r=2, max_steps=1, batch_size=4), 12, step, evaluate)


def test_lora_under_torchrun_is_refused(workspace, tmp_path):
    from tests.helpers import torchrun

    status, out, err = torchrun(sft_args(workspace) + LORA + ["--out", str(tmp_path / "run")])
    assert status != 0, "a LoRA run under torchrun must be refused"
    for rank in (0, 1):  # one line per rank, before any training
        assert (f"rlhf-engine sft: error (rank {rank}): LoRA (lora_r > 0 or a PEFT model) is not supported under "
                f"torch.distributed (2 ranks)") in err
