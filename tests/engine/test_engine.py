"""The engine end to end on tiny models built from configs: learning on a
toy reward, micro-batch invariance, exact resume, non-finite updates skipped,
and each configurable path (KL in the loss, adaptive KL, group baselines,
PPO-ptx, truncation rules)."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_engine.engine import EngineConfig, RLHFEngine
from tests.helpers import EOS, PAD, VOCAB, TargetCount, Tokenizer, make_engine, prompts, tiny_policy


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def numeric(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "memory/", "info/")) and "per_second" not in k}


def test_reward_rises_with_bounded_kl():
    engine = make_engine()
    history = [engine.step(prompts(seed=i)) for i in range(30)]
    early = sum(m["reward/score_mean"] for m in history[:5]) / 5
    late = sum(m["reward/score_mean"] for m in history[-5:]) / 5
    assert late > early + 0.15, f"reward did not rise: {early:.3f} -> {late:.3f}"
    # Rewards lie in [0, 1]: the KL-regularised optimum is at most (r_max - r_min) / kl_coef = 20 nats
    # from the reference, and a working penalty keeps PPO well inside that.
    assert all(m["kl/k1"] < 10.0 for m in history), [round(m["kl/k1"], 3) for m in history]
    assert all(m["updates/skipped"] == 0 for m in history)
    assert history[-1]["updates/applied"] == 4  # 2 epochs x 2 mini-batches


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_split_does_not_change_results(agg):
    # A large adam_eps makes each update proportional to the gradient, so the comparison sees the
    # accumulated gradients (plain Adam divides near-zero gradients by their own magnitude, which
    # turns float32 summation-order noise into full-size steps).
    results = []
    for micro in (None, 1, 3):
        engine = make_engine(micro_batch_size=micro, loss_agg=agg, stop_at_eos=True, adam_eps=1.0, lr=0.3,
                             critic_lr=0.3)
        metrics = [numeric(engine.step(prompts(seed=i))) for i in range(2)]
        results.append((params(engine.policy), params(engine.critic), metrics))
    (ref_p, ref_c, ref_m) = results[0]
    for policy, critic, metrics in results[1:]:
        for name in ref_p:
            torch.testing.assert_close(policy[name], ref_p[name], rtol=1e-5, atol=1e-6, msg=name)
        for name in ref_c:
            torch.testing.assert_close(critic[name], ref_c[name], rtol=1e-5, atol=1e-6, msg=name)
        for step, (a, b) in enumerate(zip(metrics, ref_m)):
            for key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key)


def test_concurrent_models_give_the_same_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the lanes need two threads to split
    try:
        runs = []
        for concurrent in (False, True):
            engine = make_engine(concurrent_models=concurrent)
            assert (engine.lanes.pool is not None) == concurrent
            runs.append(([numeric(engine.step(prompts(seed=i))) for i in range(2)], params(engine.policy),
                         params(engine.critic)))
    finally:
        torch.set_num_threads(threads)
    # Equal up to float32 rounding: MKL may split a product differently on one
    # thread (a lane) than on two, for some shapes (measured: 3e-7 apart after
    # two steps at this test's learning rates).
    (metrics, policy, critic), (metrics_c, policy_c, critic_c) = runs
    for step, (got, want) in enumerate(zip(metrics_c, metrics)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), step
    for name in policy:
        torch.testing.assert_close(policy_c[name], policy[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in critic:
        torch.testing.assert_close(critic_c[name], critic[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_is_bit_identical(tmp_path):
    straight = make_engine(kl_target=0.5, lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    expected = [numeric(straight.step(prompts(seed=i))) for i in range(4)]

    first = make_engine(kl_target=0.5, lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    got = [numeric(first.step(prompts(seed=i))) for i in range(2)]
    first.save(tmp_path, extra={"data_position": 2})
    resumed = make_engine(kl_target=0.5, lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    extra = resumed.load(tmp_path)
    assert extra == {"data_position": 2}
    got += [numeric(resumed.step(prompts(seed=i))) for i in range(2, 4)]
    assert got == expected
    for name, value in params(straight.policy).items():
        assert torch.equal(value, resumed.policy.state_dict()[name]), name


def test_load_refuses_other_frozen_models(tmp_path):
    engine = make_engine()
    engine.save(tmp_path)
    other = RLHFEngine(tiny_policy(), Tokenizer(), engine.config, reward_model=TargetCount(),
                       ref_model=tiny_policy(seed=1))
    with pytest.raises(ValueError, match="ref model differs"):
        other.load(tmp_path)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    engine = make_engine()
    engine.step(prompts())
    engine.save(tmp_path)
    saved = params(engine.policy)
    engine.step(prompts(seed=1))

    from rlhf_engine import checkpoint

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_objects", crash)  # after the tensors are written
    with pytest.raises(OSError):
        engine.save(tmp_path)
    monkeypatch.undo()
    fresh = make_engine()
    fresh.load(tmp_path)
    assert fresh.iteration == 1
    for name, value in saved.items():
        assert torch.equal(fresh.policy.state_dict()[name], value), name


def test_nan_reward_batch_leaves_weights_unchanged():
    engine = make_engine(reward=TargetCount(nan=True))
    before_policy, before_critic = params(engine.policy), params(engine.critic)
    metrics = engine.step(prompts())
    assert metrics["updates/skipped"] == 4 and metrics["updates/applied"] == 0
    assert metrics["updates/skipped_total"] == 4
    for name, value in params(engine.policy).items():
        assert torch.equal(value, before_policy[name]), name
    for name, value in params(engine.critic).items():
        assert torch.equal(value, before_critic[name]), name
    assert all(not s for s in engine.optimizers["policy"].state.values())


def test_kl_in_loss_and_adaptive_controller():
    engine = make_engine(kl_in="loss", kl_estimator="k3", kl_target=1e-6, kl_horizon=100)
    metrics = [engine.step(prompts(seed=i)) for i in range(3)]
    # The observed KL (> 0 after the first update) is far above the tiny target: the coefficient grows.
    assert metrics[-1]["kl/k1"] != 0 and metrics[-1]["kl/coef"] > 0.05


def test_group_baselines_without_critic():
    engine = make_engine(advantage_estimator="group", samples_per_prompt=4)
    assert engine.critic is None and "critic" not in engine.optimizers
    metrics = engine.step(prompts(n=2))
    assert metrics["updates/applied"] == 4 and "value/loss" not in metrics


def test_ptx_loss_trains_on_the_pretraining_batch():
    engine = make_engine(ptx_coef=1.0, lr=1e-2, kl_coef=0.0)
    ids = torch.tensor([[3, 9, 10, 11, 12, 13]] * 4)  # one row for each of the 4 optimizer steps
    batch = (ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    losses = [engine.step(prompts(seed=i), ptx_batch=batch)["ptx/loss"] for i in range(6)]
    assert losses[-1] < losses[0] - 0.5, losses


def test_truncated_responses():
    engine = make_engine(truncated_response="penalty", truncation_penalty=-3.0)
    metrics = engine.step(prompts())
    assert metrics["response/finished_fraction"] < 1.0
    exp_scores = metrics["reward/score_mean"]  # raw scores are reported before the rule
    assert exp_scores >= 0.0


def test_old_logprobs_from_rollout_logs_the_gap():
    engine = make_engine(old_logprobs="rollout")
    metrics = engine.step(prompts())
    assert 0.0 <= metrics["rollout/logprob_gap_mean"] < 1e-4
    recomputed = make_engine().step(prompts())
    assert 0.0 <= recomputed["rollout/logprob_gap_mean"] < 1e-4


def test_metrics_cover_phases_and_profiler(tmp_path):
    engine = make_engine(profile_dir=str(tmp_path / "trace"))
    metrics = engine.step(prompts())
    for key in ("reward/score_mean", "reward/score_std", "kl/k1", "kl/k3", "policy/entropy", "policy/clipfrac",
                "policy/approx_kl", "value/loss", "value/explained_variance", "response/length_mean",
                "tokens_per_second", "time/rollout", "time/score", "time/learn", "memory/peak_rss_mib",
                "memory/learn_mib", "info/attn_implementation"):
        assert key in metrics, key
    assert metrics["info/attn_implementation"] == "sdpa"
    assert list((tmp_path / "trace").glob("*.json"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kl_in"):
        EngineConfig(kl_in="nowhere")
    with pytest.raises(ValueError, match="samples_per_prompt"):
        EngineConfig(advantage_estimator="group")
    with pytest.raises(ValueError, match="top_p"):
        EngineConfig(top_p=0.0)


def test_hf_reward_model_and_critic_from_it():
    torch.manual_seed(0)
    config = tiny_policy().config
    reward = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
    engine = RLHFEngine(tiny_policy(), Tokenizer(), EngineConfig(max_new_tokens=4, mini_batch_size=4),
                        reward_model=reward)
    assert isinstance(engine.critic, LlamaForSequenceClassification)
    assert engine.critic is not reward
    metrics = engine.step(prompts())
    assert metrics["updates/applied"] == 2


def test_gradient_clipping_bounds_the_update():
    # adam_eps = 1 makes Adam's first update proportional to the (clipped) gradient.
    changes = {}
    for max_norm in (None, 1e-4):
        engine = make_engine(adam_eps=1.0, lr=1.0, ppo_epochs=1, mini_batch_size=8, max_grad_norm=max_norm)
        before = params(engine.policy)
        engine.step(prompts())
        changes[max_norm] = torch.sqrt(sum(((params(engine.policy)[k] - v) ** 2).sum() for k, v in before.items()))
    # Adam's bias-corrected first update is lr * g / (|g| + eps) per element: g itself when |g| << eps = 1,
    # so the update's norm is the clipped gradient norm.
    assert changes[1e-4] == pytest.approx(1e-4, rel=0.01)
    assert changes[None] > 10 * changes[1e-4]


@pytest.mark.cuda
def test_offload_on_gpu_keeps_results_and_frees_idle_models():
    results = {}
    for offload in (False, True):
        engine = make_engine(device="cuda", offload=offload)
        metrics = [numeric(engine.step(prompts(seed=i))) for i in range(2)]
        results[offload] = (metrics, params(engine.policy))
        if offload:
            where = engine.placement.where()  # after the learn phase
            assert where["ref"] == "cpu" and where["reward"] == "cpu"
            assert where["policy"].startswith("cuda") and where["critic"].startswith("cuda")
    for name, value in results[False][1].items():
        assert torch.equal(value, results[True][1][name]), name
    assert results[False][0] == results[True][0]


def test_from_pretrained_folders(tmp_path):
    from rlhf_engine.models.builders import build_policy, build_reward_model
    from rlhf_engine.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer(vocab_size=300)
    build_policy("tiny", tokenizer, num_hidden_layers=1).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    build_reward_model("tiny", tokenizer, num_hidden_layers=1).save_pretrained(tmp_path / "rm")
    engine = RLHFEngine.from_pretrained(tmp_path / "policy", tmp_path / "rm",
                                        EngineConfig(max_new_tokens=4, mini_batch_size=2))
    metrics = engine.step(["reverse: abc", "sort: cba"])
    assert metrics["updates/applied"] == 1 and metrics["response/length_mean"] > 0


# -- every accepted configuration runs right (issue: dropout, checkpointing, PPO-ptx, ...) --------------------

def gpt2_pair(init=0.02, seed=0):
    """A GPT-2 policy and reward model with their stock dropout (0.1 everywhere), built in training mode as
    from_config leaves them."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    def config():
        return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD,
                          eos_token_id=EOS, bos_token_id=2, initializer_range=init, num_labels=1)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config()), GPT2ForSequenceClassification(config())


@pytest.mark.parametrize("init", [0.02, 0.5], ids=["stock_init", "wide_init"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_nothing_changes_when_nothing_is_learned_despite_dropout(init, checkpointing):
    policy, reward = gpt2_pair(init)
    config = EngineConfig(max_new_tokens=8, stop_at_eos=False, mini_batch_size=8, ppo_epochs=1, lr=0.0,
                          critic_lr=0.0, seed=0, gradient_checkpointing=checkpointing)
    engine = RLHFEngine(policy, Tokenizer(), config, reward_model=reward)
    metrics = engine.step(prompts())
    assert metrics["policy/clipfrac"] == 0.0 and metrics["policy/approx_kl"] == 0.0
    assert metrics["value/clipfrac"] == 0.0
    assert metrics["rollout/logprob_gap_mean"] < 1e-5  # the sampler ran the same (eval) function


def _recorded_gradients(engine):
    """Patch ``engine`` so that each optimizer step records the trained models' gradients first."""
    seen = []
    original = engine._optimizer_step

    def record(total_loss, train_policy):
        seen.append({f"{name}.{n}": p.grad.clone() for name in ("policy", "critic")
                     for n, p in engine._trained(name).named_parameters() if p.grad is not None})
        return original(total_loss, train_policy)

    engine._optimizer_step = record
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    import transformers

    grads = {}
    for checkpointing in (False, True):
        if family == "gpt2":
            policy, reward = gpt2_pair()
        else:
            config_class, lm, cls = {"llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
                                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                                               transformers.Qwen2ForSequenceClassification)}[family]
            config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                                  eos_token_id=EOS, bos_token_id=2, num_labels=1)
            torch.manual_seed(0)
            policy, reward = lm(config), cls(config)
        engine = RLHFEngine(policy, Tokenizer(), EngineConfig(max_new_tokens=6, mini_batch_size=4, ppo_epochs=1,
                                                              lr=1e-3, critic_lr=1e-3, seed=0,
                                                              concurrent_models=False,
                                                              gradient_checkpointing=checkpointing),
                            reward_model=reward)
        seen = _recorded_gradients(engine)
        engine.step(prompts())
        grads[checkpointing] = seen
    assert len(grads[True]) == len(grads[False]) == 2
    for plain, checkpointed in zip(grads[False], grads[True]):
        assert plain.keys() == checkpointed.keys()
        for name, g in plain.items():
            scale = g.abs().max().clamp(min=1e-12)
            assert ((checkpointed[name] - g).abs().max() / scale) < 1e-4, name


def test_ptx_gives_each_optimizer_step_fresh_rows():
    engine = make_engine(ptx_coef=0.5)  # 8 prompts, mini-batch 4, 2 epochs: 4 optimizer steps
    assert engine.updates_per_iteration(8) == 4
    ids = torch.arange(3, 3 + 8 * 5).reshape(8, 5) % (VOCAB - 3) + 3
    ids[:, 0] = torch.arange(8) + 3  # row r starts with token r + 3
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[1, :2] = False  # a left-padded row
    seen = []
    original = engine._ptx_step

    def spy(batch, micro):
        seen.append(batch[0][:, 0].tolist())
        return original(batch, micro)

    engine._ptx_step = spy
    metrics = engine.step(prompts(), ptx_batch=(ids, attn, attn))
    assert seen == [[3, 7], [4, 8], [5, 9], [6, 10]]  # step j takes rows j::4, never a row twice
    assert metrics["ptx/loss"] > 0
    with pytest.raises(ValueError, match="at least 4"):
        engine.step(prompts(), ptx_batch=(ids[:3], attn[:3], attn[:3]))
    with pytest.raises(ValueError, match="ptx_coef"):
        engine.step(prompts())
    with pytest.raises(ValueError, match="ptx_coef is 0"):
        make_engine().step(prompts(), ptx_batch=(ids, attn, attn))


def test_ptx_rows_are_scored_at_their_own_positions():
    """A left-padded PPO-ptx row gets positions counted from its first real token (GPT-2 has absolute
    positions): its LM loss equals the unpadded row's."""
    policy, reward = gpt2_pair()
    engine = RLHFEngine(policy, Tokenizer(), EngineConfig(max_new_tokens=4, mini_batch_size=4, ptx_coef=1.0,
                                                          lr=0.0, critic_lr=0.0), reward_model=reward)
    row = torch.tensor([[5, 9, 11, 4, 8]])
    padded = torch.tensor([[PAD, PAD, 5, 9, 11, 4, 8]])
    losses = []
    for ids in (row, padded):
        mask = ids != PAD
        losses.append(float(engine._ptx_step((ids, mask, mask), 4)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("settings, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(truncated_response="bootstrap"), "truncated_response='bootstrap'"),
    (dict(kl_in="loss", kl_estimator="k1"), "kl_estimator"),
    (dict(kl_in="reward", kl_estimator="k2"), "kl_estimator"),
    (dict(kl_in="reward", kl_estimator="k3"), "kl_estimator"),
    (dict(kl_coef=-1.0), "kl_coef"),
    (dict(score_clip=-1.0), "score_clip"),
    (dict(lr=float("inf")), "lr"),
    (dict(clip_low=1.5), "clip_low"),
    (dict(clip_low=-0.5), "clip_low"),
    (dict(gamma=2.0), "gamma"),
    (dict(lam=-1.0), "lam"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(kl_coef=float("nan")), "kl_coef"),
    (dict(kl_coef=0.0, kl_target=1.0), "kl_target"),
    (dict(advantage_estimator="group", samples_per_prompt=2, critic_warmup_iterations=1),
     "critic_warmup_iterations"),
    (dict(device="tpu7"), "device"),
    (dict(offload_policy="bogus=all"), "bogus"),
])
def test_config_refuses_what_cannot_run_right(settings, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**settings)


def test_kl_estimator_defaults_follow_the_placement():
    assert EngineConfig().kl_estimator_used == "k1" and EngineConfig().kl_divergence == "KL(pi || ref)"
    loss = EngineConfig(kl_in="loss")
    assert loss.kl_estimator_used == "k3" and loss.kl_divergence == "KL(ref || pi)"
    assert EngineConfig(kl_in="loss", kl_estimator="k2").kl_divergence == "KL(pi || ref)"


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_in_the_loss_pulls_toward_the_reference(estimator):
    """With no reward signal (a constant score) the only gradient is the KL term's: its steps bring a
    policy that has drifted back toward the reference."""
    class Constant(nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(len(input_ids))

    engine = make_engine(kl_in="loss", kl_estimator=estimator, kl_coef=1.0, lr=3e-2, ppo_epochs=1,
                         mini_batch_size=8, advantage_estimator="group", samples_per_prompt=2,
                         reward=Constant(), max_new_tokens=6)
    with torch.no_grad():  # drift away from the reference
        for p in engine.policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    constant = [engine.step(prompts(n=8, seed=i))["kl/k1"] for i in range(6)]
    assert constant[-1] < 0.5 * constant[0], constant


@pytest.mark.parametrize("rule", ["group", "rloo", "dr_grpo"])
def test_group_baselines(rule):
    from rlhf_engine.engine import ppo

    scores = torch.tensor([1.0, 2.0, 4.0, -1.0, 0.0, 0.0, 3.0, 3.5])
    out = ppo.group_baselines(scores, 4, rule).double()
    grouped = scores.double().view(2, 4)
    mean = grouped.mean(-1, keepdim=True)
    expected = {"group": (grouped - mean) / (grouped.std(-1, keepdim=True) + 1e-6),
                "dr_grpo": grouped - mean,
                "rloo": grouped - (grouped.sum(-1, keepdim=True) - grouped) / 3}[rule].view(-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    engine = make_engine(advantage_estimator=rule, samples_per_prompt=2)
    metrics = engine.step(prompts(n=4))
    assert metrics["updates/applied"] == 4


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_policy_loss_metric_is_the_optimised_loss(agg):
    engine = make_engine(loss_agg=agg, advantage_estimator="group", samples_per_prompt=2, ppo_epochs=1,
                         micro_batch_size=1, stop_at_eos=True)
    losses = []
    original = engine._optimizer_step

    def record(total_loss, train_policy):
        losses.append(float(total_loss))
        return original(total_loss, train_policy)

    engine._optimizer_step = record
    metrics = engine.step(prompts(n=4))
    assert metrics["policy/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-7)


def test_string_prompts_use_the_sft_prompt_format(tmp_path):
    from rlhf_engine.models import encode_prompt
    from rlhf_engine.models.builders import build_policy, build_reward_model
    from rlhf_engine.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer(vocab_size=300)
    engine = RLHFEngine(build_policy("tiny", tokenizer, num_hidden_layers=1), tokenizer,
                        EngineConfig(max_new_tokens=4, mini_batch_size=2),
                        reward_model=build_reward_model("tiny", tokenizer, num_hidden_layers=1))
    ids, mask = engine._encode(["reverse: abc", "sort: cba"])
    assert ids[1][mask[1]].tolist() == encode_prompt(tokenizer, "sort: cba")
    with pytest.raises(ValueError, match="not one string"):
        engine.step("reverse: abc")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.step([[5] * engine.policy.config.max_position_embeddings])


def test_top_k_sampling_reports_its_distance_from_the_trained_distribution():
    filtered = make_engine(top_k=3).step(prompts())
    assert filtered["rollout/filter_kl"] > 0.05
    assert "rollout/filter_kl" not in make_engine().step(prompts())


def test_bf16_decode_steps_are_not_routed_to_the_float32_kernel():
    from rlhf_engine.models.decode import decode_linears

    model = tiny_policy()
    with torch.autocast("cpu", dtype=torch.bfloat16), decode_linears(model):
        assert not any("forward" in vars(m) for m in model.modules())
    with decode_linears(model):
        assert any("forward" in vars(m) for m in model.modules())


def test_user_attention_kept_unless_equivalent():
    import transformers

    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2))
    gemma.set_attn_implementation("eager")  # soft-capped attention logits: only eager applies them
    engine = RLHFEngine(gemma, Tokenizer(), EngineConfig(max_new_tokens=2, mini_batch_size=4,
                                                         critic_init="policy"), reward_model=TargetCount())
    assert engine.attn_implementation == "eager" and gemma.config._attn_implementation == "eager"
    llama = tiny_policy()
    llama.set_attn_implementation("eager")
    engine = RLHFEngine(llama, Tokenizer(), EngineConfig(max_new_tokens=2, mini_batch_size=4,
                                                         critic_init="policy"), reward_model=TargetCount())
    assert engine.attn_implementation == "sdpa"


def test_reward_model_of_another_vocabulary_is_refused():
    config = tiny_policy().config
    other = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "vocab_size": VOCAB + 8,
                                                          "num_labels": 1}))
    with pytest.raises(ValueError, match="reward model's vocabulary"):
        RLHFEngine(tiny_policy(), Tokenizer(), EngineConfig(), reward_model=other)


def test_swapped_folders_are_refused(tmp_path):
    from rlhf_engine.models.builders import build_policy, build_reward_model
    from rlhf_engine.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer(vocab_size=300)
    build_policy("tiny", tokenizer, num_hidden_layers=1).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    build_reward_model("tiny", tokenizer, num_hidden_layers=1).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="at random"):
        RLHFEngine.from_pretrained(tmp_path / "rm", tmp_path / "policy", EngineConfig())


def test_resume_keeps_the_configured_kl_controller(tmp_path):
    engine = make_engine(kl_target=1.0, kl_horizon=100)
    engine.step(prompts())
    engine.save(tmp_path)
    coef = engine.kl.coef
    resumed = make_engine(kl_target=2.0, kl_horizon=50)
    with pytest.warns(UserWarning, match="target 1.0 -> 2.0"):
        resumed.load(tmp_path)
    assert resumed.kl.target == 2.0 and resumed.kl.horizon == 50 and resumed.kl.coef == coef


def test_resume_applies_the_configured_learning_rates(tmp_path):
    engine = make_engine(lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    engine.step(prompts())
    engine.save(tmp_path)
    same = make_engine(lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    same.load(tmp_path)  # no change: no warning, the checkpoint's rates
    assert same.schedulers["policy"].get_last_lr() == engine.schedulers["policy"].get_last_lr()
    resumed = make_engine(lr=3e-2, critic_lr=3e-3, lr_schedule="linear", total_steps=40, lr_warmup_steps=2)
    with pytest.warns(UserWarning, match=r"lr 0.003 -> 0.03"):
        resumed.load(tmp_path)
    # the same point of the schedule, ten times the peak
    assert resumed.schedulers["policy"].get_last_lr()[0] == pytest.approx(
        10 * engine.schedulers["policy"].get_last_lr()[0])
    assert resumed.optimizers["policy"].param_groups[0]["lr"] == resumed.schedulers["policy"].get_last_lr()[0]
    assert resumed.schedulers["critic"].get_last_lr() == engine.schedulers["critic"].get_last_lr()
