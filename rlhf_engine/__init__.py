"""rlhf_engine: a custom-kernel RLHF engine (SFT -> reward model -> PPO).

The fused ops (log-probs, KL, advantages, PPO losses) live in
:mod:`rlhf_engine.ops`; each runs on the ``torch``, ``cpu``, ``triton`` or
``cuda`` backend.
"""
from rlhf_engine.errors import BackendUnavailable
from rlhf_engine import ops

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "ops", "__version__"]
