"""Model folders the commands refuse (exit 2, one line naming the folder and
its role) instead of running with meaningless scores: a folder whose head
would be freshly initialised (a reward model's given as a policy, folders
swapped, a causal LM's given as a reward model or judge, a bare body), a
folder without a tokenizer, and a reward model, critic or second policy
whose tokenizer gives other token ids than the policy's."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from rlhf_engine import cli
from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline.run import UsageError, load_causal_lm, load_reward_model
from rlhf_engine.pipeline.vocab import tokenizer_difference, tokenizer_key


def tiny_lm(tok, **config):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, **config))


def other_tokenizer():
    return byte_tokenizer(["reverse: sort: count a: upper: \nAnswer:\n"] * 20, 300)


@pytest.fixture(scope="module")
def folders(workspace, tmp_path_factory):
    """The workspace's folders (lm, rm, data) and more: models with another tokenizer, a tied-embedding
    reward model, a bare body, a reward model saved without its tokenizer."""
    root = tmp_path_factory.mktemp("folders")
    tok, other = byte_tokenizer(), other_tokenizer()
    lm_other = tiny_lm(other)
    tied = tiny_lm(tok, tie_word_embeddings=True)
    saved = {"lm_other": (lm_other, other), "rm_other": (reward_model_from_causal_lm(lm_other), other),
             "rm_tied": (reward_model_from_causal_lm(tied), tok), "body": (LlamaModel(tiny_lm(tok).config), tok),
             "rm_no_tokenizer": (reward_model_from_causal_lm(tiny_lm(tok)), None)}
    for name, (model, tokenizer) in saved.items():
        model.save_pretrained(root / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(root / name)
    paths = {name: str(root / name) for name in saved}
    paths.update({name: str(workspace / name) for name in ("lm", "rm")})
    paths.update({name: str(workspace / f"{name}.jsonl") for name in ("prompts", "rankings")})
    return paths


def refused(capsys, argv, tmp_path, *parts):
    """Run the command; assert it exits 2 with one error line holding every one of ``parts``."""
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a new run folder each call
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf-engine {argv[0]}: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def ppo(policy, reward_model, prompts, *extra):
    return ["ppo", "--policy", policy, "--reward_model", reward_model, "--prompts", prompts, "--iterations", "1",
            "--prompts_per_iteration", "2", "--max_new_tokens", "2", "--mini_batch_size", "2", "--device", "cpu",
            *extra]


@pytest.mark.parametrize("rm", ["rm", "rm_tied"])
def test_ppo_with_the_folders_swapped_is_refused(folders, tmp_path, capsys, rm):
    # with tied embeddings the reward model's folder even loads as a causal LM without a missing weight
    line = refused(capsys, ppo(folders[rm], folders["lm"], folders["prompts"]), tmp_path,
                   f"--policy {folders[rm]} holds a reward model (LlamaForSequenceClassification)",
                   "freshly initialised")
    assert "swapped" in line


def test_a_causal_lm_as_reward_model_critic_or_judge_is_refused(folders, tmp_path, capsys):
    refused(capsys, ppo(folders["lm"], folders["lm"], folders["prompts"]), tmp_path,
            f"--reward_model {folders['lm']} holds a causal language model (LlamaForCausalLM)",
            "score head would be freshly initialised")
    refused(capsys, ppo(folders["lm"], folders["rm"], folders["prompts"], "--critic", folders["lm"]), tmp_path,
            f"--critic {folders['lm']} holds a causal language model")
    refused(capsys, ["eval", "--policy_a", folders["lm"], "--policy_b", folders["lm"], "--prompts",
                     folders["prompts"], "--judge", folders["lm"], "--max_new_tokens", "2"], tmp_path,
            f"--judge {folders['lm']} holds a causal language model")


def test_a_reward_model_or_a_bare_body_as_a_causal_lm_is_refused(folders, tmp_path, capsys):
    refused(capsys, ["rm", "--model", folders["rm"], "--rankings", folders["rankings"], "--normalize_rewards",
                     "false"], tmp_path, f"--model {folders['rm']} holds a reward model")
    refused(capsys, ["eval", "--policy_a", folders["lm"], "--policy_b", folders["body"], "--prompts",
                     folders["prompts"]], tmp_path,
            f"--policy_b {folders['body']} (LlamaModel) lacks weights of LlamaForCausalLM: lm_head.weight would be "
            f"freshly initialised")


def test_a_reward_model_with_another_tokenizer_is_refused(folders, tmp_path, capsys):
    refused(capsys, ppo(folders["lm"], folders["rm_other"], folders["prompts"]), tmp_path,
            f"--reward_model {folders['rm_other']} has another tokenizer than --policy {folders['lm']} "
            f"(vocabularies of 450 vs {len(other_tokenizer())} tokens)")
    refused(capsys, ppo(folders["lm"], folders["rm"], folders["prompts"], "--critic", folders["rm_other"]), tmp_path,
            f"--critic {folders['rm_other']} has another tokenizer than --policy {folders['lm']}")
    refused(capsys, ppo(folders["lm"], folders["rm_no_tokenizer"], folders["prompts"]), tmp_path,
            f"--reward_model {folders['rm_no_tokenizer']} holds no tokenizer")


def test_eval_policies_with_different_tokenizers_are_refused(folders, tmp_path, capsys):
    refused(capsys, ["eval", "--policy_a", folders["lm"], "--policy_b", folders["lm_other"], "--prompts",
                     folders["prompts"]], tmp_path,
            f"--policy_b {folders['lm_other']} has another tokenizer than --policy_a {folders['lm']}")


def test_loaders_accept_the_right_folders(folders):
    assert type(load_causal_lm(folders["lm"])[0]).__name__ == "LlamaForCausalLM"
    assert type(load_reward_model(folders["rm_tied"])).__name__ == "LlamaForSequenceClassification"
    with pytest.raises(UsageError, match="no such model folder"):
        load_reward_model(folders["lm"] + "-missing", role="--judge")


def test_tokenizer_difference_and_key():
    tok, other = byte_tokenizer(), other_tokenizer()
    assert tokenizer_difference(tok, byte_tokenizer()) is None
    assert tokenizer_key(tok) == tokenizer_key(byte_tokenizer()) != tokenizer_key(other)
    assert tokenizer_difference(tok, other) == f"vocabularies of 450 vs {len(other)} tokens"
    swapped = byte_tokenizer()
    swapped.eos_token = swapped.bos_token
    assert tokenizer_difference(tok, swapped) == f"eos_token_id {tok.eos_token_id} vs {tok.bos_token_id}"
    assert tokenizer_key(swapped) != tokenizer_key(tok)
    # the same size, other merges
    a = byte_tokenizer(["reverse: sort: count a: upper:"] * 20, 270)
    b = byte_tokenizer(["the quick brown fox"] * 20, 270)
    assert len(a) == len(b) == 270
    assert tokenizer_difference(a, b) == "11 of 270 tokens have other ids" and tokenizer_key(a) != tokenizer_key(b)
