"""rlhf_engine: a custom-kernel RLHF engine (SFT -> reward model -> PPO).

The fused ops (log-probs, KL, advantages, PPO losses) live in
:mod:`rlhf_engine.ops`; each runs on the ``torch``, ``cpu``, ``triton`` or
``cuda`` backend.

Importing this package loads neither torch nor the ops: ``rlhf_engine.ops``
is imported on first use (``rlhf_engine.ops``, ``from rlhf_engine import
ops``), and with it torch, the native libraries and the
``torch.ops.rlhf_engine.*`` custom ops. Code that calls
``torch.ops.rlhf_engine.<name>`` directly imports :mod:`rlhf_engine.ops`
first.
"""
import importlib

from rlhf_engine.errors import BackendUnavailable

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "ops", "__version__"]

_LAZY_SUBMODULES = ("ops",)


def __getattr__(name):
    # PEP 562: the ops (and torch) load on first use, not on `import rlhf_engine`.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
