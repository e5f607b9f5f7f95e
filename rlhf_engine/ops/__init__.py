"""The fused RL ops (contract: shared/API.md). Every op takes ``backend=``:
"auto", "torch", "cpu", "triton" or "cuda"."""
from rlhf_engine.ops.checks import debug_checks
from rlhf_engine.ops.logprobs import token_logprobs

__all__ = ["debug_checks", "token_logprobs"]
