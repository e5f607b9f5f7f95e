"""Training a model as the function it was scored as: no dropout.

PPO's ratio ``pi_new / pi_old`` compares the policy's learn-phase forward
with its score-phase forward (run in eval mode); the critic's clipped value
loss does the same for values. Any dropout in the learn passes makes the two
different functions, so an unchanged model already shows a clipped fraction
and an approximate KL (TRL, OpenRLHF and veRL disable dropout in RL for the
same reason).

:func:`training_without_dropout` therefore runs a model in eval mode, with
one exception: HuggingFace's gradient checkpointing only recomputes a layer
while that layer is in training mode (``GradientCheckpointingLayer``), so
with checkpointing on, the checkpointed layers (and the modules above them,
whose forward may switch checkpointing on or off) stay in training mode,
everything inside those layers is in eval mode, and any dropout probability
those training-mode modules read directly (``self.dropout`` floats used with
``F.dropout(..., training=self.training)``) is set to 0 while the block
runs. Every dropout in transformers is gated by its module's ``training``
flag or such a probability, so the learn forward equals the eval forward.
"""
import contextlib



def checkpointed_layers(model):
    """The modules of ``model`` that recompute their forward in backward
    (HuggingFace layers with ``gradient_checkpointing`` set)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and _is_layer(m)]


def _is_layer(module):
    # GradientCheckpointingLayer (transformers >= 4.52); older models checkpoint in the body's loop.
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


@contextlib.contextmanager
def training_without_dropout(model):
    """While open, ``model`` trains as the function its eval mode computes:
    eval mode everywhere except the checkpointed layers and their ancestors
    (see the module docstring). Restores every module's mode on exit.
    ``model`` may be None (nothing happens)."""
    if model is None:
        yield
        return
    modes = {m: m.training for m in model.modules()}
    zeroed = {}
    try:
        model.eval()
        layers = set(checkpointed_layers(model))
        keep = set()  # the layers' names and their ancestors' ("" is the model)
        for name, module in model.named_modules():
            if module in layers:
                parts = name.split(".")
                keep.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        for name, module in model.named_modules():
            if name in keep:
                module.training = True
                for attr, value in vars(module).items():
                    if "dropout" in attr and isinstance(value, float) and value > 0:
                        zeroed[(module, attr)] = value
        for module, attr in zeroed:
            setattr(module, attr, 0.0)
        yield
    finally:
        for (module, attr), value in zeroed.items():
            setattr(module, attr, value)
        for module, mode in modes.items():
            module.training = mode
