"""How a prompt becomes the tokens a policy sees before its response.

One encoder for every consumer: the SFT stage trains on it, the engine
encodes string prompts with it, evaluation and probes sample from it. A
tokenizer with a chat template gets one user message and the generation
prompt; one without gets the plain format ``<bos>{prompt}\\nAnswer:\\n``
(the response then follows, ended by ``<eos>``). A batch of encoded prompts
becomes the left-padded tensors every sampler takes with :func:`left_pad`.
"""
from typing import List, Sequence

# The separator ends with a newline so that BPE tokenizers do not glue a
# trailing space onto the response's first word.
PLAIN_SEPARATOR = "\nAnswer:\n"


def encode_prompt(tokenizer, prompt: str) -> List[int]:
    """Token ids of ``prompt`` as the model sees it before its response.

    With a chat template (``tokenizer.chat_template`` set): the template
    applied to one user message with the generation prompt (the template adds
    its own special tokens). Without: the plain format ``<bos>`` (when the
    tokenizer has one) + ``prompt`` + :data:`PLAIN_SEPARATOR`.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer(prompt + PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"])


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """``list[list[int]]`` -> ``(ids [B, P] int64, mask [B, P] bool)``, left-padded."""
    import torch  # here, so that encoding prompts does not load torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
    return ids, mask
