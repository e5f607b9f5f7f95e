"""Fixtures of the pipeline tests (module-scoped: each test module gets its own)."""
import pytest
import torch

from tests.helpers import sft_args


def write_model_folders(root, tok):
    """A tiny Llama SFT model folder ``root/lm`` with ``tok`` and a reward
    model folder ``root/rm`` built from it (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    for name, model in (("lm", lm), ("rm", reward_model_from_causal_lm(lm))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data files, a tiny SFT model folder and a reward model folder from it."""
    from rlhf_engine.models.tokenizer import byte_tokenizer
    from rlhf_engine.pipeline import task
    from rlhf_engine.pipeline.data import write_jsonl

    root = tmp_path_factory.mktemp("cli")
    write_jsonl(root / "demos.jsonl", task.make_demonstrations(24, seed=0))
    write_jsonl(root / "rankings.jsonl", task.make_rankings(12, 3, seed=1))
    write_jsonl(root / "prompts.jsonl", task.make_prompts(12, seed=2))
    write_model_folders(root, byte_tokenizer())
    return root


@pytest.fixture(scope="module")
def full_sft(workspace, tmp_path_factory):
    """An uninterrupted SFT run folder, the reference of every resumed one."""
    from rlhf_engine import cli

    out = tmp_path_factory.mktemp("full") / "sft"
    assert cli.main(sft_args(workspace) + ["--out", str(out)]) == 0
    return out
