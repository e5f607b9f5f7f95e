"""The fused RL ops (contract: shared/API.md). Every op takes ``backend=``:
"auto", "torch", "cpu", "triton" or "cuda"."""
from rlhf_engine.ops.advantages import gae, group_advantages, masked_whiten
from rlhf_engine.ops.checks import debug_checks
from rlhf_engine.ops.kl import kl_penalty, kl_shaped_rewards
from rlhf_engine.ops.linear_logprobs import linear_token_logprobs
from rlhf_engine.ops.logprobs import token_logprobs
from rlhf_engine.ops.losses import pairwise_reward_loss, ppo_policy_loss, ppo_value_loss

__all__ = ["debug_checks", "gae", "group_advantages", "kl_penalty", "kl_shaped_rewards", "linear_token_logprobs", "masked_whiten", "pairwise_reward_loss",
           "ppo_policy_loss", "ppo_value_loss", "token_logprobs"]
