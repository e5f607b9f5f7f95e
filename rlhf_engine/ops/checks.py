"""Input validation shared by the ops: static checks raise ValueError naming
the argument; value checks (which need the data) run on CPU tensors always and
on GPU tensors only under :func:`debug_checks`, since they cost a sync."""
import torch

_debug = {"enabled": False}


def debug_checks(enabled=True):
    """Turn on value checks of GPU inputs (a device-to-host sync per op).

    Off by default: on GPU tensors, invalid values (labels out of range)
    then give NaN outputs instead of a ValueError.
    """
    _debug["enabled"] = bool(enabled)


def value_checks_on(device):
    """Whether ops check input values on ``device``."""
    return device.type == "cpu" or _debug["enabled"]


def tensor(name, x, *, dtypes=None, kind=None):
    """``x`` must be a tensor; of one of ``dtypes``, or floating with kind='float'."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if kind == "float" and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(x.dtype).replace('torch.', '')}")


def same_device(**tensors):
    """All named tensors must be on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def positive_float(name, value):
    """``value`` must be a finite number > 0; returned as a Python float."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (out > 0 and out != float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return out


def debug_enabled():
    """Whether :func:`debug_checks` is on (value checks on every device)."""
    return _debug["enabled"]


def finite(name, x):
    """Under :func:`debug_checks`, ``x`` must hold no NaN or inf (a sync).
    Otherwise NaN inputs give NaN outputs, as each op documents."""
    if _debug["enabled"] and x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def mask(name, m, shape):
    """A 0/1 mask of ``shape`` (bool, or any float/int dtype holding 0/1) as
    bool (a view when it already is bool)."""
    tensor(name, m)
    if m.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(m.shape)}")
    return m if m.dtype == torch.bool else m != 0
