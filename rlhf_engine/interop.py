"""The fused ops for any array framework, through DLPack.

    import numpy as np
    from rlhf_engine import interop

    logp = interop.token_logprobs(logits, labels)        # numpy in, numpy out
    adv, ret = interop.gae(rewards, values, mask, gamma=1.0, lam=0.95)

Every op of :mod:`rlhf_engine.ops` is here under the same name and
arguments. Array arguments may be anything implementing ``__dlpack__``
(NumPy, CuPy, JAX, PyTorch, ...); they are viewed without a copy and the op
runs on the device they live on. Array results come back as arrays of the
first array argument's framework (through its ``from_dlpack``, again without
a copy), or as DLPack-capable torch tensors when that framework has no
``from_dlpack``. Scalars and strings pass through. No autograd: these are
the forward ops (use rlhf_engine.ops from PyTorch for gradients).

NumPy refuses to export read-only arrays through DLPack; pass a writable
array (``np.array(x)``) in that case.
"""
import functools
import sys

import torch

from rlhf_engine import ops as _ops

__all__ = [name for name in _ops.__all__ if name != "debug_checks"]


def _is_array(x):
    return hasattr(x, "__dlpack__") and not isinstance(x, torch.Tensor)


def _to_torch(x):
    """A torch view of a DLPack array (no copy); anything else unchanged."""
    return torch.from_dlpack(x) if _is_array(x) else x


# The module whose ``from_dlpack`` makes arrays of a framework, by the root
# module of its array type (JAX arrays are jaxlib types).
_FROM_DLPACK = {"numpy": "numpy", "cupy": "cupy", "jax": "jax.numpy", "jaxlib": "jax.numpy"}


def _from_torch(x, like):
    """Results back into the framework of ``like`` (tensors, tuples, dicts)."""
    if isinstance(x, torch.Tensor):
        module = sys.modules.get(_FROM_DLPACK.get(type(like).__module__.split(".")[0], ""))
        return module.from_dlpack(x) if module is not None else x
    if isinstance(x, tuple):
        return tuple(_from_torch(v, like) for v in x)
    if isinstance(x, dict):
        return {k: _from_torch(v, like) for k, v in x.items()}
    return x


def _wrap(op):
    @functools.wraps(op)
    def run(*args, **kwargs):
        like = next((a for a in (*args, *kwargs.values()) if _is_array(a)), None)
        with torch.no_grad():
            out = op(*map(_to_torch, args), **{k: _to_torch(v) for k, v in kwargs.items()})
        return _from_torch(out, like) if like is not None else out

    return run


for _name in __all__:
    globals()[_name] = _wrap(getattr(_ops, _name))
