"""The engine with LoRA (``lora_r > 0``): only adapters and heads train, the
reference is the starting policy, four models on two copies of the base
weights, trainable-only checkpoints that resume bit for bit, gradient
checkpointing, no LoRA dropout in the PPO passes, and the refusals."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.models import causal_lm_logprobs, lora
from tests.helpers import EOS, PAD, VOCAB, Tokenizer, make_engine, prompts, same_bits, tiny_policy

pytest.importorskip("peft")


def seq_cls_reward(seed=1):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=2, num_labels=1)
    return LlamaForSequenceClassification(config)


def lora_engine(critic_init="reward", **overrides):
    """A LoRA engine whose critic sits on the (HF) reward model's backbone."""
    settings = dict(max_new_tokens=8, stop_at_eos=False, mini_batch_size=4, ppo_epochs=2, lr=3e-3, critic_lr=3e-3,
                    kl_coef=0.05, seed=0, lora_r=4, critic_init=critic_init)
    settings.update(overrides)
    return RLHFEngine(tiny_policy(), Tokenizer(), EngineConfig(**settings), reward_model=seq_cls_reward())


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_adapters_and_heads_change():
    engine = lora_engine()
    before = {"policy": snapshot(engine.policy), "critic": snapshot(engine.critic)}
    for _ in range(2):
        engine.step(prompts(8))
    for name, model in (("policy", engine.policy), ("critic", engine.critic)):
        changed = set()
        for key, p in model.named_parameters():
            if not same_bits(p, before[name][key]):
                changed.add(key)
            if not p.requires_grad:
                assert same_bits(p, before[name][key]), f"{name}: frozen {key} changed"
            else:
                assert "lora_" in key or "modules_to_save" in key, f"{name}: {key} trains"
        assert any("lora_B" in key for key in changed), name
    assert any("modules_to_save" in key for key in changed)  # the value head trained


def sequences(n=6, length=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    score = torch.zeros(n, length, dtype=torch.bool)
    score[:, 5:] = True
    return ids, mask, score


def test_reference_is_the_starting_policy_and_reward_the_starting_reward_model():
    ids, mask, score = sequences()
    start = causal_lm_logprobs(tiny_policy().eval(), ids, mask, score)
    from rlhf_engine.models.scalar_heads import sequence_scores
    with torch.no_grad():
        start_scores = sequence_scores(seq_cls_reward().eval(), ids, mask)
    engine = lora_engine()
    for _ in range(2):
        engine.step(prompts(8))
    with torch.no_grad():
        with engine._reference() as ref:
            assert same_bits(causal_lm_logprobs(ref, ids, mask, score), start)
        assert not same_bits(causal_lm_logprobs(engine.policy, ids, mask, score), start)  # the policy trained
        # the same function; one-row matmuls may round differently through peft's layer (float32 rounding)
        torch.testing.assert_close(sequence_scores(engine.reward, ids, mask), start_scores, rtol=1e-6, atol=1e-6)


def resident_bytes(*models):
    """Bytes of the distinct storages behind the models' parameters and buffers."""
    seen = {}
    for model in models:
        model = model.peft_model if isinstance(model, lora.WithoutAdapters) else model
        for t in list(model.parameters()) + list(model.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def test_four_models_on_two_copies_of_the_base_weights():
    base = resident_bytes(tiny_policy()) + resident_bytes(seq_cls_reward())
    engine = lora_engine()
    assert engine.ref is None and isinstance(engine.reward, lora.WithoutAdapters)
    total = resident_bytes(engine.policy, engine.reward, engine.critic)
    adapters = sum(p.numel() * p.element_size() for m in (engine.policy, engine.critic)
                   for p in m.parameters() if p.requires_grad)
    assert total == base + adapters, (total, base, adapters)
    # without LoRA: four copies
    full = make_engine(critic_init="reward", reward=seq_cls_reward())
    assert resident_bytes(full.policy, full.ref, full.reward, full.critic) > 1.9 * base


def trained_state(engine):
    return {f"{n}.{k}": v for n, m in (("policy", engine.policy), ("critic", engine.critic))
            for k, v in lora.trainable_state_dict(m).items()}


def test_resume_is_bit_identical_and_checkpoints_hold_adapters_only(tmp_path):
    straight = lora_engine()
    for _ in range(4):
        straight.step(prompts(8, seed=straight.iteration))
    first = lora_engine()
    for _ in range(2):
        first.step(prompts(8, seed=first.iteration))
    path = first.save(tmp_path / "lora")
    resumed = lora_engine()
    resumed.load(tmp_path / "lora")
    for _ in range(2):
        resumed.step(prompts(8, seed=resumed.iteration))
    want, got = trained_state(straight), trained_state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert same_bits(got[key], want[key]), key
    # the checkpoint: adapters, heads and their optimizer states only
    from rlhf_engine.checkpoint import load_checkpoint
    tensors, _ = load_checkpoint(path)
    for name, model in (("policy", first.policy), ("critic", first.critic)):
        assert set(tensors[name]) <= {k for k, p in model.named_parameters() if p.requires_grad} | {
            k for k, _ in model.named_buffers()}
    full = make_engine(critic_init="reward", reward=seq_cls_reward())
    full.step(prompts(8))
    full.save(tmp_path / "full")
    # the tensors' bytes (on these toy models the files' per-tensor overhead, ~2 kB, dominates the sizes)
    lora_bytes, full_bytes = payload(first), payload(full)
    assert lora_bytes < 0.25 * full_bytes, (lora_bytes, full_bytes)  # rank 4 on 32-wide layers: 1/4 of their size
    assert 0 < first.checkpoint_bytes < full.checkpoint_bytes


def payload(engine):
    from rlhf_engine.engine.state import collect

    tensors = collect(engine)[0]
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value.numel() * value.element_size())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(tensors)
    return sum(found)


def test_a_changed_base_is_refused_on_load(tmp_path):
    engine = lora_engine()
    engine.step(prompts(8))
    engine.save(tmp_path)
    other = lora_engine()
    with torch.no_grad():
        next(p for p in other.critic.parameters() if not p.requires_grad).add_(1.0)
    other._fingerprints["reward"] = type(other._fingerprints["reward"])(
        __import__("rlhf_engine.engine.setup", fromlist=["x"]).fingerprint(other.reward))
    with pytest.raises(ValueError, match="reward model differs"):
        other.load(tmp_path)


def test_gradient_checkpointing_gives_the_same_training():
    plain, checkpointed = lora_engine(), lora_engine(gradient_checkpointing=True)
    for engine in (plain, checkpointed):
        for _ in range(2):
            engine.step(prompts(8, seed=engine.iteration))
    want, got = trained_state(plain), trained_state(checkpointed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_lora_dropout_is_off_in_the_ppo_passes():
    engine = lora_engine(lora_dropout=0.1, lr=0.0, critic_lr=0.0)
    metrics = engine.step(prompts(8))
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["value/clipfrac"] == 0.0
    assert abs(metrics["policy/approx_kl"]) < 1e-6 if "policy/approx_kl" in metrics else True


def test_critic_from_the_policy_and_a_ready_peft_policy():
    engine = make_engine(lora_r=4)  # critic_init="policy", a generic reward model
    assert lora.is_peft(engine.critic) and engine.reward is not None
    engine.step(prompts(8))
    ready = lora.add_lora(tiny_policy(), lora.LoraOptions(lora_r=2))
    engine = RLHFEngine(ready, Tokenizer(), EngineConfig(max_new_tokens=4, mini_batch_size=4, critic_init="policy"),
                        reward_model=seq_cls_reward())
    assert engine.policy is ready and engine.ref is None
    engine.step(prompts(4))


def test_refusals():
    with pytest.raises(ValueError, match="lora_r must be an int >= 0"):
        EngineConfig(lora_r=-1)
    with pytest.raises(ValueError, match="lora_alpha must be"):
        EngineConfig(lora_r=4, lora_alpha=0)
    with pytest.raises(ValueError, match="has no effect without lora_r"):
        EngineConfig(lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_target_modules"):
        EngineConfig(lora_r=4, lora_target_modules="q_proj,,v_proj")
    with pytest.raises(ValueError, match="not supported under torch.distributed"):
        lora.refuse_distributed(2)
    lora.refuse_distributed(1)
    with pytest.raises(ValueError, match="sequence-classification reward model"):
        make_engine(lora_r=4, critic_init="reward")  # a generic reward module has no backbone to share
