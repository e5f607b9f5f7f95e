"""Loading a model folder as the kind of model a caller needs, refusing one
whose head (or any other part) would be initialised at random: folders
swapped (a reward model's given as the policy, or the other way round), a
bare body, a folder of another architecture. Both the engine's
``from_pretrained`` and the pipeline's commands load through it."""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

# What each class refuses by the folder's config.json architectures, before loading any weights
# (a tied-embedding causal LM loaded as a reward model reports no missing weights).
_OTHER_KIND = {AutoModelForCausalLM: (("ForSequenceClassification",), "a reward model", "language-model"),
               AutoModelForSequenceClassification: (("ForCausalLM", "LMHeadModel"), "a causal language model",
                                                    "score")}


def load_pretrained(auto_class, path, role, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` in float32.

    Raises:
        ValueError: naming ``role`` (what the folder was given as, e.g.
            ``--policy``) and ``path``, when the folder holds the other kind
            of model or lacks weights the model needs.
    """
    suffixes, kind, head = _OTHER_KIND[auto_class]
    architectures = _architectures(path)
    other = [name for name in architectures if name.endswith(suffixes)]
    if other:
        raise ValueError(f"{role} {path} holds {kind} ({other[0]}): its {head} head would be freshly initialised "
                         f"at random (folders swapped?)")
    model, info = auto_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{role} {path} ({', '.join(architectures) or 'no architectures in config.json'}) lacks "
                         f"weights of {type(model).__name__}: {shown} would be freshly initialised at random")
    return model


def _architectures(path):
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # from_pretrained says what is wrong with it
    return list(config.get("architectures") or [])
