"""Optimisation shared by the training stages and the PPO engine: one AdamW
builder with one weight-decay rule, the learning-rate schedule, its resume
rule, and gradient clipping inside the fused AdamW's own pass."""
import math

import torch


def trainable_parameters(model):
    """The parameters of ``model`` that require gradients, in order."""
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model, *, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """The fused AdamW (one kernel per step instead of a dozen passes over
    every state tensor) over ``model``'s trainable parameters.

    Weight decay applies to weight matrices (parameters of 2+ dimensions)
    only: decaying norm gains and biases pulls them towards 0, not towards a
    prior. The matrices form the first parameter group, the rest the
    second (a group with no parameters is left out).

    Raises:
        ValueError: when ``model`` has no trainable parameters.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


def clipped_step(optimizer, grad_norm, max_norm):
    """``optimizer.step()`` (a fused AdamW) with the gradients clipped to the
    global norm ``max_norm`` (None: not clipped), given their norm
    ``grad_norm`` (a float).

    Clipping applies only when the norm exceeds the bound, and divides the
    gradients by ``(grad_norm + 1e-6) / max_norm``, as ``clip_grad_norm_``
    multiplies them, but inside the fused kernel's own pass (its
    ``grad_scale``, torch.amp.GradScaler's protocol: the optimizer reads
    the attribute during this step only) instead of in a pass of its own
    over every gradient."""
    if max_norm is None or not grad_norm > max_norm:
        optimizer.step()
        return
    device = optimizer.param_groups[0]["params"][0].device
    optimizer.grad_scale = torch.tensor((grad_norm + 1e-6) / max_norm, device=device)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def lr_factor(step, *, warmup, total, schedule):
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up
    over ``warmup`` steps, then constant, linear or cosine decay to 0 at
    ``total`` (no decay when ``total`` is 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def set_peak_lrs(scheduler, lrs):
    """Make a ``LambdaLR`` restored from a checkpoint continue with the peak
    learning rates ``lrs`` (one per parameter group) under its own lambdas
    at its current step: the rates a run configured with ``lrs`` uses from
    here (a resumed run's configured ``lr`` applies, not the checkpoint's).
    With the checkpoint's own rates it changes nothing (the same products)."""
    scheduler.base_lrs = [float(lr) for lr in lrs]
    last = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, last):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = last  # what get_last_lr() reports (torch keeps it there)
