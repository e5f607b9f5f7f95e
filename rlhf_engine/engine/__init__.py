"""The lean hybrid PPO engine (see engine.py): four colocated models,
rollout -> score -> learn each iteration, offload between phases."""
from rlhf_engine.engine.config import EngineConfig
from rlhf_engine.engine.engine import RLHFEngine

__all__ = ["EngineConfig", "RLHFEngine"]
