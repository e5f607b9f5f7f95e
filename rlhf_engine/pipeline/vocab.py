"""Whether two tokenizers give the same token ids.

Models are fed token ids: a reward model, a critic or a second policy can
share a policy's sequences only when its tokenizer has the same vocabulary
(``get_vocab()``, every token at the same id) and the same BOS, EOS and UNK
ids. The pad id is not compared: padding is masked out, so it never reaches
a score.
"""
import hashlib
import json
import weakref
from typing import Optional

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unk_token_id")

_KEYS = weakref.WeakKeyDictionary()  # tokenizer -> (what the key was computed from, key)


def tokenizer_difference(a, b) -> Optional[str]:
    """None when ``a`` and ``b`` give the same token ids (see the module
    doc), else what differs, in a few words (for an error message)."""
    for name in SPECIAL_IDS:
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} {getattr(a, name, None)} vs {getattr(b, name, None)}"
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"vocabularies of {len(vocab_a)} vs {len(vocab_b)} tokens"
    differ = sum(vocab_b.get(token) != index for token, index in vocab_a.items())
    return f"{differ} of {len(vocab_a)} tokens have other ids" if differ else None


def tokenizer_key(tokenizer) -> str:
    """A digest of what :func:`tokenizer_difference` compares: two
    tokenizers have the same key exactly when it finds no difference.
    Computed once per tokenizer object (again if its size or special ids
    change)."""
    stamp = (len(tokenizer), *(getattr(tokenizer, name, None) for name in SPECIAL_IDS))
    cached = _KEYS.get(tokenizer)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    text = json.dumps([sorted(tokenizer.get_vocab().items()), stamp[1:]])
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    _KEYS[tokenizer] = (stamp, key)
    return key
