"""rlhf_engine.interop: the ops on NumPy and JAX arrays through DLPack."""
import numpy as np
import pytest
import torch

from rlhf_engine import interop
from rlhf_engine.ops import gae, ppo_policy_loss, token_logprobs


def test_numpy_in_numpy_out_matches_torch(gen):
    logits = torch.randn(3, 5, 41, generator=gen).numpy()
    labels = torch.randint(0, 41, (3, 5), generator=gen).numpy()
    labels[0, 0] = -100
    logp, entropy = interop.token_logprobs(logits, labels, temperature=0.9, return_entropy=True)
    assert isinstance(logp, np.ndarray) and isinstance(entropy, np.ndarray)
    ref_logp, ref_entropy = token_logprobs(torch.from_numpy(logits), torch.from_numpy(labels), temperature=0.9,
                                           return_entropy=True)
    assert np.array_equal(logp, ref_logp.numpy()) and np.array_equal(entropy, ref_entropy.numpy())


def test_inputs_are_viewed_not_copied():
    logits = np.random.default_rng().standard_normal((4, 9)).astype(np.float32)
    view = interop._to_torch(logits)
    assert view.data_ptr() == logits.__array_interface__["data"][0]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels must have shape"):
        interop.token_logprobs(np.zeros((2, 3), np.float32), np.zeros(3, np.int64))


def test_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7)), dtype=jnp.float32)
    labels = jnp.asarray([1, 6])
    logp = interop.token_logprobs(logits, labels)
    assert type(logp).__module__.startswith("jax")
    ref = token_logprobs(torch.from_numpy(np.asarray(logits)), torch.tensor([1, 6]))
    assert np.allclose(np.asarray(logp), ref.numpy(), rtol=1e-6, atol=0)


def test_numpy_gae_and_policy_loss_stats(gen):
    rewards = torch.randn(3, 11, generator=gen)
    values = torch.randn(3, 11, generator=gen)
    mask = torch.rand(3, 11, generator=gen) > 0.3
    adv, ret = interop.gae(rewards.numpy(), values.numpy(), mask.numpy(), gamma=0.99, lam=0.95)
    ref_adv, ref_ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert isinstance(adv, np.ndarray) and np.array_equal(adv, ref_adv.numpy()) and np.array_equal(ret, ref_ret.numpy())

    old = torch.randn(3, 11, generator=gen)
    loss, stats = interop.ppo_policy_loss((old + 0.1).numpy(), old.numpy(), adv, mask.numpy())
    ref_loss, ref_stats = ppo_policy_loss(old + 0.1, old, ref_adv, mask)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss == ref_loss.item()
    assert set(stats) == set(ref_stats) and all(isinstance(v, np.ndarray) for v in stats.values())


def test_jax_gae():
    jnp = pytest.importorskip("jax.numpy")
    rewards = jnp.asarray([[0.0, 1.0, 2.0]], dtype=jnp.float32)
    values = jnp.zeros((1, 3), dtype=jnp.float32)
    mask = jnp.asarray([[True, False, True]])
    adv, ret = interop.gae(rewards, values, mask)
    assert type(adv).__module__.startswith("jax")
    # gamma = lam = 1: the masked middle step is skipped, so A_0 = r_0 + r_2.
    assert np.array_equal(np.asarray(adv), np.array([[2.0, 0.0, 2.0]], np.float32))
