"""The vLLM rollout backend (``rollout_backend="vllm"``,
rlhf_engine/engine/vllm_rollout.py) against the engine's own sampler.

Runs where vLLM is installed (on the CPU: ``bash scripts/vllm_env.sh``, then
``.venv-vllm/bin/python -m pytest tests/engine/test_vllm.py``) and is skipped
with the install line elsewhere, where only the refusal is tested. vLLM's CPU
attention takes head sizes of 32 and up, so the policy here is a tiny Llama
with 32-wide heads. One ``LLM`` (a few seconds to start) is shared by the
engines of this module: it holds nothing between rollouts but the weights,
which every rollout syncs first."""
import copy

import pytest
import torch

from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.engine.rollout import SamplingParams, sample
from rlhf_engine.engine.vllm_rollout import VLLMRollout, vllm_missing_reason
from rlhf_engine.models import causal_lm_logprobs
from rlhf_engine.models.prompts import left_pad
from tests.helpers import EOS, PAD, VOCAB, TargetCount, Tokenizer, prompts

MISSING = vllm_missing_reason()
needs_vllm = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _policy(seed=0, eos_bias=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[EOS] += eos_bias  # EOS likely enough to end some responses
    return model


TEMPLATE = _policy()


@pytest.fixture(scope="module")
def shared_vllm():
    rollout = VLLMRollout(TEMPLATE, device="cpu", dtype="float32", kv_cache_bytes=32 << 20, seed=0)
    yield rollout
    rollout.close()


def _engine(shared, backend="vllm", policy=None, **overrides):
    settings = dict(device="cpu", max_new_tokens=8, stop_at_eos=True, mini_batch_size=4, ppo_epochs=2, lr=3e-3,
                    critic_lr=3e-3, critic_init="policy", kl_coef=0.05, seed=0, rollout_backend=backend)
    if backend == "vllm":
        settings["vllm_kv_cache_bytes"] = 32 << 20
    settings.update(overrides)
    engine = RLHFEngine(policy or copy.deepcopy(TEMPLATE), Tokenizer(), EngineConfig(**settings),
                        reward_model=TargetCount())
    if backend == "vllm":
        assert isinstance(engine.vllm, VLLMRollout) and engine.vllm.llm is None  # started lazily
        engine.vllm = shared
    return engine


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _numbers(metrics):
    return {k: v for k, v in metrics.items()
            if isinstance(v, float) and not k.startswith(("time/", "memory/", "tokens_per", "rollout_tokens"))}


@pytest.mark.skipif(MISSING is None, reason="vLLM is installed here")
def test_refused_without_vllm_with_the_install_line():
    with pytest.raises(ValueError, match=r"rollout_backend='vllm'.*pip install"):
        EngineConfig(rollout_backend="vllm")


def test_top_k_top_p_refused_with_vllm():
    for case in ({"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="top_k=0 and top_p=1"):
            EngineConfig(rollout_backend="vllm", **case)


@needs_vllm
def test_greedy_matches_the_engine_sampler_across_updates(shared_vllm):
    """Greedy tokens from vLLM and from the engine's sampler on the same
    weights, before and after PPO updates (weights synced each iteration)."""
    engine = _engine(shared_vllm)
    ids, mask = left_pad(prompts(6, seed=3), PAD)
    greedy = SamplingParams(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, temperature=0.0)
    start = [p.detach().clone() for p in engine.policy.parameters()]
    for iteration in range(4):
        shared_vllm.sync(engine.policy)
        ours = sample(engine.policy, ids, mask, greedy)
        theirs = shared_vllm.sample(ids, mask, greedy, seeds=range(len(ids)))
        assert torch.equal(theirs.sequences, ours.sequences), f"iteration {iteration}"
        assert torch.equal(theirs.response_mask, ours.response_mask)
        assert torch.equal(theirs.finished, ours.finished)
        assert (theirs.sampler_logprobs - ours.sampler_logprobs).abs().max() < 1e-5
        metrics = engine.step(prompts(seed=iteration))
        assert metrics["updates/applied"] > 0 and "time/sync" in metrics
        assert shared_vllm.kv_cache_bytes_held() == 0  # released after the rollout
    assert any(not torch.equal(a, p) for a, p in zip(start, engine.policy.parameters()))


@needs_vllm
def test_sampled_rollout_masks_eos_and_logprobs(shared_vllm):
    policy = _policy(seed=1).eval()
    ids, mask = left_pad(prompts(16, seed=5), PAD)
    params = SamplingParams(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, temperature=0.8)
    shared_vllm.sync(policy)
    r = shared_vllm.sample(ids, mask, params, seeds=range(100, 116))
    P = r.prompt_length
    resp = r.response_mask[:, P:]
    lengths = resp.sum(-1)
    assert r.finished.any() and (~r.finished).any(), "the batch should have finished and cut responses"
    assert resp.shape[1] == int(lengths.max())
    for b in range(len(ids)):
        n = int(lengths[b])
        assert resp[b, :n].all() and not resp[b, n:].any()  # a prefix, right-padded
        tokens = r.sequences[b, P:]
        assert (tokens[n:] == PAD).all()
        assert bool(r.finished[b]) == (tokens[n - 1].item() == EOS)
        assert (tokens[:n - 1] != EOS).all()  # stopped at the first EOS
        assert bool(r.finished[b]) or n == params.max_new_tokens
    assert torch.equal(r.attention_mask, torch.cat([mask, resp], 1))
    assert torch.equal(r.sequences[:, :P], ids)
    assert (r.sampler_logprobs[~r.response_mask] == 0).all()
    trainer = causal_lm_logprobs(policy, r.sequences, r.attention_mask, r.response_mask, temperature=0.8,
                                 position_ids=r.position_ids)
    gap = (trainer - r.sampler_logprobs)[r.response_mask].abs().max().item()
    assert gap < 1e-5, gap


@needs_vllm
def test_same_seed_same_run_and_exact_resume(shared_vllm, tmp_path):
    a = _engine(shared_vllm)
    first = a.step(prompts(seed=0))
    a.save(tmp_path / "ckpt")
    rest_a = [a.step(prompts(seed=i)) for i in (1, 2)]
    again = _engine(shared_vllm)
    assert _numbers(again.step(prompts(seed=0))) == _numbers(first)  # the same tokens, the same run
    b = _engine(shared_vllm)
    b.load(tmp_path / "ckpt")
    rest_b = [b.step(prompts(seed=i)) for i in (1, 2)]
    assert [_numbers(m) for m in rest_b] == [_numbers(m) for m in rest_a]
    assert all(torch.equal(x, y) for x, y in zip(a.policy.parameters(), b.policy.parameters()))


@needs_vllm
def test_ppo_raises_the_reward_like_the_engine_sampler(shared_vllm):
    gains = {}
    for backend in ("engine", "vllm"):
        engine = _engine(shared_vllm, backend, stop_at_eos=False, max_new_tokens=8)
        scores = [engine.step(prompts(seed=i))["reward/score_mean"] for i in range(20)]
        gains[backend] = sum(scores[-5:]) / 5 - sum(scores[:5]) / 5
    assert gains["engine"] > 0.05 and gains["vllm"] > 0.05, gains  # both about +0.1 here
    assert gains["vllm"] > 0.5 * gains["engine"], gains


@needs_vllm
def test_kv_cache_memory_released_between_phases():
    size = 256 << 20
    rollout = VLLMRollout(TEMPLATE, device="cpu", dtype="float32", kv_cache_bytes=size, seed=0)
    try:
        rollout.sync(TEMPLATE)
        held = rollout.kv_cache_bytes_held()
        assert held >= size * 0.9
        before = _rss_mib()
        rollout.release()
        after = _rss_mib()
        assert rollout.kv_cache_bytes_held() == 0
        assert before - after > 0.9 * held / 2**20, (before, after)
        rollout.sync(TEMPLATE)  # back, and still right
        ids, mask = left_pad(prompts(4), PAD)
        greedy = SamplingParams(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=0.0)
        assert torch.equal(rollout.sample(ids, mask, greedy, seeds=range(4)).sequences,
                           sample(TEMPLATE, ids, mask, greedy).sequences)
    finally:
        rollout.close()


@needs_vllm
def test_process_state_restored_after_start(shared_vllm):
    """Starting vLLM leaves torch.set_num_threads working, the global RNG where it was and the GC unfrozen."""
    import gc

    threads, fn = torch.get_num_threads(), torch.set_num_threads
    rollout = VLLMRollout(TEMPLATE, device="cpu", dtype="float32", kv_cache_bytes=16 << 20, seed=0)
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        rollout.sync(TEMPLATE)
        assert torch.equal(torch.rand(3), expected)
        assert torch.set_num_threads is fn and torch.get_num_threads() == threads
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(threads)
        assert gc.get_freeze_count() == 0
    finally:
        rollout.close()


def test_policy_weights_merge_lora_deltas():
    """A LoRA policy's weights go to vLLM as the plain model's names with each adapter's delta merged in: the
    state dict of PEFT's own merge_and_unload (float64 to compare), the PEFT model left untouched. No vLLM needed."""
    peft = pytest.importorskip("peft")
    from rlhf_engine.engine.vllm_rollout import policy_weights

    base = _policy().double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sent = dict(policy_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sent.keys() == merged.keys()
    for name in merged:
        assert torch.allclose(sent[name], merged[name], rtol=1e-12, atol=1e-12), name
    assert any(not torch.equal(sent[n], base_w) for n, base_w in _policy().double().state_dict().items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = _policy()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in policy_weights(plain))


@needs_vllm
def test_start_refusals_name_the_cause():
    """A head size vLLM's CPU attention lacks, and a KV cache too small for one sequence, are refused with the
    option to change (not a kernel error mid-rollout, nor vLLM's advice about gpu_memory_utilization)."""
    from tests.helpers import tiny_policy

    narrow = tiny_policy()  # head size 8
    with pytest.raises(ValueError, match=r"head size 8 .*rollout_backend='engine'"):
        VLLMRollout(narrow, device="cpu", dtype="float32", kv_cache_bytes=1 << 20, seed=0).sync(narrow)
    small = VLLMRollout(TEMPLATE, device="cpu", dtype="float32", kv_cache_bytes=20000, seed=0)
    try:
        with pytest.raises(ValueError, match=r"vllm_kv_cache_bytes=20000 .*32768 bytes.*raise vllm_kv_cache_bytes"):
            small.sync(TEMPLATE)
    finally:
        small.close()
