"""How a prompt becomes the tokens a policy sees before its response, and
how a conversation becomes tokens with the assistant's turns marked.

One encoder for every consumer: the SFT stage trains on it, the engine
encodes string prompts with it, evaluation and probes sample from it. A
prompt is a string or a conversation (a list of ``{"role", "content"}``
messages whose last one is not the assistant's).

A tokenizer with a chat template renders a string prompt as one user
message, a conversation as it is, both with the generation prompt. A
tokenizer without one gets the plain format: ``<bos>{prompt}\\nAnswer:\\n``
(the response then follows, ended by ``<eos>``); a conversation's run of
non-assistant messages is their contents joined by newlines, followed by
``\\nAnswer:\\n``, and each assistant message is its content and ``<eos>``
(so a conversation of one user message encodes as that message's string).

Assistant turns (:func:`encode_conversation`): with a chat template, the
text a template adds for assistant message ``i`` is the rendered
conversation through ``i`` minus the rendering of the messages before ``i``
with the generation prompt. The template must render a conversation prefix
by prefix (each of those renderings a prefix of the whole one: true of the
common templates), else the encoder refuses it. A turn's trained text ends
just after the tokenizer's EOS when the template writes one (ChatML/Qwen's
``<|im_end|>``, Llama 3's ``<|eot_id|>``); the last assistant turn gets
``<eos>`` appended when it has none, as plain-format responses do, so that
the policy learns to stop where PPO's sampler stops. The rendered text is
tokenised segment by segment (prompt, each turn, the text between turns),
so the prompt's tokens are exactly :func:`encode_prompt`'s.

A batch of encoded prompts becomes the left-padded tensors every sampler
takes with :func:`left_pad`.
"""
from typing import Dict, List, Sequence, Tuple, Union

# The separator ends with a newline so that BPE tokenizers do not glue a
# trailing space onto the response's first word.
PLAIN_SEPARATOR = "\nAnswer:\n"
ASSISTANT = "assistant"

Message = Dict[str, str]
PromptLike = Union[str, Sequence[Message]]


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokens(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _check_messages(messages) -> List[Message]:
    if isinstance(messages, str) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content'")
    return list(messages)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False)


def encode_prompt(tokenizer, prompt: PromptLike) -> List[int]:
    """Token ids of ``prompt`` (a string or a conversation) as the model sees
    it before its response (see the module doc).

    With a chat template (``tokenizer.chat_template`` set): the template
    applied to the conversation (a string: one user message) with the
    generation prompt (the template adds its own special tokens). Without:
    the plain format ``<bos>`` (when the tokenizer has one) + ``prompt`` +
    :data:`PLAIN_SEPARATOR`.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence):
        messages = _check_messages(prompt)
        if messages[-1]["role"] == ASSISTANT:
            raise ValueError("a prompt conversation must not end with an assistant message: the policy answers it")
    else:
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if _has_template(tokenizer):
        return _tokens(tokenizer, _render(tokenizer, messages, True))
    return [t for ids, _ in _plain_segments(tokenizer, messages, len(messages)) for t in ids]


def encode_conversation(tokenizer, messages: Sequence[Message],
                        prompt_length: int) -> Tuple[List[int], List[int], List[bool]]:
    """``(prompt_ids, response_ids, mask)`` of a conversation whose first
    ``prompt_length`` messages are the prompt (the last of them not the
    assistant's) and whose rest starts and ends with an assistant message.

    ``prompt_ids`` are :func:`encode_prompt` of the prompt messages;
    ``response_ids`` the tokens after them; ``mask`` (one per response
    token) is True on the assistant turns' tokens (their EOS included), the
    tokens SFT trains on, False on the other turns and the template's text
    between turns (see the module doc for the rule).

    Raises:
        ValueError: a malformed conversation, or a chat template that does
            not render it prefix by prefix.
    """
    messages = _check_messages(messages)
    if not 0 < prompt_length < len(messages):
        raise ValueError(f"prompt_length must be in [1, {len(messages) - 1}], got {prompt_length}")
    if messages[prompt_length - 1]["role"] == ASSISTANT:
        raise ValueError("the prompt must not end with an assistant message")
    if messages[prompt_length]["role"] != ASSISTANT or messages[-1]["role"] != ASSISTANT:
        raise ValueError("the response must start and end with an assistant message")
    if _has_template(tokenizer):
        segments = _template_segments(tokenizer, messages, prompt_length)
    else:
        segments = _plain_segments(tokenizer, messages, prompt_length)
    (prompt_ids, _), rest = segments[0], segments[1:]
    response = [t for ids, _ in rest for t in ids]
    mask = [trained for ids, trained in rest for _ in ids]
    return prompt_ids, response, mask


def _plain_segments(tokenizer, messages, prompt_length):
    """``[(ids, trained)]``: the plain format (module doc), the prompt first
    (the messages before ``prompt_length`` with the separator)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    segments, waiting = [(bos, False)], []
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            waiting.append(message["content"])
            if i + 1 < len(messages) and messages[i + 1]["role"] != ASSISTANT:
                continue
            segments.append((_tokens(tokenizer, "\n".join(waiting) + PLAIN_SEPARATOR), False))
            waiting = []
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has no eos_token_id: assistant turns must end with EOS")
            segments.append((_tokens(tokenizer, message["content"]) + [tokenizer.eos_token_id], True))
        if i + 1 == prompt_length:
            prompt = [t for ids, _ in segments for t in ids]
            segments = [(prompt, False)]
    return segments


def _template_segments(tokenizer, messages, prompt_length):
    """``[(ids, trained)]`` of the rendered conversation, cut at the
    assistant turns' boundaries (module doc); the first is the prompt."""
    full = _render(tokenizer, messages, False)
    cuts = []

    def prefix(k, generation_prompt):
        text = _render(tokenizer, messages[:k], generation_prompt)
        if not full.startswith(text):
            raise ValueError(f"the tokenizer's chat template does not render this conversation prefix by prefix "
                             f"(messages[:{k}] renders as other text than the start of the whole conversation): "
                             f"the assistant turns cannot be located")
        return len(text)

    for i in range(prompt_length, len(messages)):
        if messages[i]["role"] == ASSISTANT:
            start, end = prefix(i, True), prefix(i + 1, False)
            cuts.append((start, end))
    segments, position, eos = [], 0, tokenizer.eos_token
    for n, (start, end) in enumerate(cuts):
        if start < position:
            raise ValueError("the tokenizer's chat template renders overlapping assistant turns")
        segments.append((_tokens(tokenizer, full[position:start]), False))
        turn = full[start:end]
        if eos and eos in turn:
            turn = turn[:turn.index(eos) + len(eos)]
        ids = _tokens(tokenizer, turn)
        if n == len(cuts) - 1 and not (eos and turn.endswith(eos)):
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has no eos_token_id: the last assistant turn must end with EOS")
            ids.append(tokenizer.eos_token_id)
        segments.append((ids, True))
        position = start + len(turn)
    return [segment for k, segment in enumerate(segments) if k == 0 or segment[0]]


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
