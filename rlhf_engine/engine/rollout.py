"""The rollout phase: sample responses to a batch of prompts from the policy.

:func:`sample` runs a HuggingFace causal LM over left-padded prompts and
returns a :class:`~rlhf_engine.engine.batch.Rollout`: one prefill forward,
then one single-token forward per decode step against a KV cache, with only
the last position's logits computed (``logits_to_keep=1``).

Sampling a step: ``logits / temperature``, then top-k, then top-p (nucleus,
over the distribution left by top-k, renormalized), then one draw per row by
inverse CDF: a single uniform number per row, located in the cumulative
probabilities with ``searchsorted``. ``torch.multinomial`` and the
exponential (Gumbel) trick both draw one random number per vocabulary entry,
which dominates a CPU decode step once the vocabulary is large.

``sampler_logprobs`` are log-probs of the *unfiltered* tempered distribution,
``log_softmax(logits / temperature)[token]``: what the trainer's
``causal_lm_logprobs(..., temperature=temperature)`` computes for the same
tokens (top-k/top-p only decide which tokens may be drawn). Greedy decoding
(``temperature == 0``) reports temperature-1 log-probs. With top-k/top-p the
tokens come from the filtered distribution, not the one PPO trains; the gap
is measured per token as ``filter_kl``, KL(filtered || unfiltered) = -log of
the probability mass the filter kept (the engine reports its mean as
``rollout/filter_kl``).

Choices measured on the CPU (float32 Llama models, batch 8, 16-token prompts,
32 new tokens; benchmarks/engine/bench_rollout.py compares the whole sampler
with ``model.generate``):

* The KV cache is ``models.decode.decode_cache``: a ``DynamicCache`` whose
  layers write into one buffer sized for the rollout and attend over views
  of its filled prefix. ``DynamicCache`` itself concatenates the whole cache
  at every step; ``StaticCache`` attends over (and pads the mask to) its full
  preallocated length at every step, which cost more than that copy here.
* The model's ``nn.Linear`` layers run decode steps (a few rows) through the
  decode-step kernel (``models.decode.decode_linears``): MKL's sgemm packs
  every weight before a product of 8 rows, and read the weights at a third
  of the memory's speed.
* The model's own attention implementation: for one query token SDPA and
  eager attention cost the same here, so the sampler does not switch it.
* The attention mask lives in one preallocated ``[B, P + max_new_tokens]``
  buffer; each step passes a view of its first columns (``generate``
  concatenates a new mask every step).
* One host sync per step, the "every row finished" check, and only when
  stopping at EOS is on.

On a GPU the same code runs unchanged, but a small-batch decode step is
bound by kernel launches and Python. What would pay off there (not
implemented, not measured): a ``StaticCache`` with the decode step captured
in a CUDA graph (``torch.compile(mode="reduce-overhead")``; fixed shapes need
the full-length mask), and checking "every row finished" only every few
steps to drop the per-step sync.
"""
import dataclasses
import inspect
import numbers

import torch
from rlhf_engine.engine.batch import Rollout
from rlhf_engine.models.decode import decode_cache, decode_linears
from rlhf_engine.models.causal_lm import positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How :func:`sample` draws responses."""

    max_new_tokens: int
    eos_token_id: int | None  # None: never stops early
    pad_token_id: int
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_at_eos: bool = True  # False: always exactly max_new_tokens (EOS sampled like any token)

    def __post_init__(self):
        _integer("max_new_tokens", self.max_new_tokens, minimum=1)
        if self.eos_token_id is not None:
            _integer("eos_token_id", self.eos_token_id, minimum=0)
        _integer("pad_token_id", self.pad_token_id, minimum=0)
        _integer("top_k", self.top_k, minimum=0)
        if not _real(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"stop_at_eos must be a bool, got {self.stop_at_eos!r}")


def _integer(name, value, *, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample(model, prompt_ids, prompt_mask, params, *, generator=None, uniforms=None):
    """Sample one response per prompt.

    Args:
        model: a HuggingFace causal LM (``...ForCausalLM`` / ``...LMHeadModel``);
            run in eval mode under ``torch.inference_mode()``, its train/eval
            modes restored afterwards.
        prompt_ids: ``[B, P]`` integer token ids, left-padded.
        prompt_mask: ``[B, P]`` bool or 0/1: the real prompt tokens (every
            row has at least one, and its padding is on the left).
        params: :class:`SamplingParams`.
        generator: ``torch.Generator`` on the prompts' device; the same seed
            gives the same rollout.
        uniforms: instead of ``generator``, the random numbers themselves:
            ``[B, max_new_tokens]`` float32 in [0, 1), row ``b``'s draw at
            step ``t`` made with ``uniforms[b, t]`` (see :func:`row_uniforms`).

    Returns:
        :class:`~rlhf_engine.engine.batch.Rollout` with ``T = P + R``, ``R``
        the decode steps taken: ``max_new_tokens`` without EOS stopping, else
        fewer when every row has emitted EOS. Responses are right-padded with
        ``pad_token_id``; the masks include the EOS token; ``finished[b]``:
        row ``b`` ends with EOS. ``sampler_logprobs`` are float32, 0 outside
        ``response_mask`` (see the module docstring for their definition).

    Raises:
        ValueError: naming the argument, for wrong types, shapes, devices,
            values or padding.
    """
    prompt_mask = _check(model, prompt_ids, prompt_mask, params, generator)
    if uniforms is not None and (generator is not None or uniforms.shape != (len(prompt_ids), params.max_new_tokens)):
        raise ValueError(f"uniforms must be [B, max_new_tokens] = [{len(prompt_ids)}, {params.max_new_tokens}] and "
                         f"exclude generator, got {tuple(uniforms.shape)}")
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            decoded = _decode(model, prompt_ids.long(), prompt_mask, params, generator, uniforms)
    finally:
        for module, training in modes:
            module.training = training
    return _assemble(prompt_ids.long(), prompt_mask, *decoded)


def _check(model, prompt_ids, prompt_mask, params, generator):
    """Validate the inputs; return ``prompt_mask`` as bool. One host sync
    for the value checks."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids must be a non-empty [B, P] tensor, got {getattr(prompt_ids, 'shape', type(prompt_ids))}")
    if prompt_ids.dtype.is_floating_point or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must be an integer tensor, got {prompt_ids.dtype}")
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask must be a tensor of the shape of prompt_ids {tuple(prompt_ids.shape)}, "
                         f"got {getattr(prompt_mask, 'shape', type(prompt_mask))}")
    if prompt_mask.device != prompt_ids.device:
        raise ValueError(f"prompt_mask is on {prompt_mask.device}, prompt_ids on {prompt_ids.device}")
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != prompt_ids.device.type):
        raise ValueError(f"generator must be a torch.Generator on {prompt_ids.device.type}, got {generator!r}")
    vocab = model.get_input_embeddings().num_embeddings
    for name, value in (("params.eos_token_id", params.eos_token_id), ("params.pad_token_id", params.pad_token_id)):
        if value is not None and value >= vocab:
            raise ValueError(f"{name} {value} is outside the model's vocabulary of {vocab} tokens")
    mask = prompt_mask.bool()
    bad_ids = (prompt_ids < 0) | (prompt_ids >= vocab)  # padding is embedded too
    bad_values = (prompt_mask != 0) & (prompt_mask != 1)
    not_left_padded = mask[:, :-1] & ~mask[:, 1:]  # a real token followed by padding
    bad = torch.stack([bad_ids.any(), bad_values.any(), not_left_padded.any(), ~mask[:, -1].all()]).tolist()
    if bad[0]:
        raise ValueError(f"prompt_ids holds token ids outside the model's vocabulary [0, {vocab})")
    if bad[1]:
        raise ValueError("prompt_mask must be bool or hold only 0 and 1")
    if bad[2] or bad[3]:
        raise ValueError("prompt_mask must be left-padded with at least one real token per row "
                         "(its last column all real)")
    return mask


def _decode(model, prompt_ids, prompt_mask, params, generator, uniforms):
    """The decode loop. Returns ``tokens`` ``[B, R]`` int64 (pad after EOS),
    ``logprobs`` and ``filter_kl`` ``[B, R]`` float32 (0 after EOS; see
    :func:`next_token`), ``alive`` ``[B, R]`` bool
    (the response tokens, EOS included) and ``finished`` ``[B]`` bool."""
    batch, prompt_len = prompt_ids.shape
    steps, pad, eos = params.max_new_tokens, params.pad_token_id, params.eos_token_id
    stop = params.stop_at_eos and eos is not None
    device = prompt_ids.device
    mask = torch.zeros(batch, prompt_len + steps, dtype=torch.bool, device=device)
    mask[:, :prompt_len] = prompt_mask
    tokens = torch.full((batch, steps), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    filter_kl = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    alive = torch.ones(batch, steps, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = decode_cache(model, prompt_len + steps)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    with decode_linears(model):
        positions = positions_from_mask(prompt_mask)
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, **extra).logits[:, -1]
        positions = positions[:, -1:].clone()
        taken = steps
        for t in range(steps):
            token, logp, kl = next_token(logits, params, generator, None if uniforms is None else uniforms[:, t:t + 1])
            if stop:
                alive[:, t] = ~finished
                token = token.masked_fill(finished, pad)
                logp = logp.masked_fill(finished, 0.0)
                kl = kl.masked_fill(finished, 0.0)
                finished |= token == eos
            tokens[:, t] = token
            logprobs[:, t] = logp
            filter_kl[:, t] = kl
            if t + 1 == steps or (stop and finished.all().item()):
                taken = t + 1
                break
            # Finished rows keep decoding (pad tokens, masked in, as generate does):
            # their outputs are discarded and never reach the other rows.
            mask[:, prompt_len + t] = True
            positions += 1
            logits = model(input_ids=token[:, None], attention_mask=mask[:, :prompt_len + t + 1],
                           position_ids=positions, past_key_values=cache, use_cache=True, **extra).logits[:, -1]
    if not stop and eos is not None:
        finished = tokens[:, taken - 1] == eos
    return tokens[:, :taken], logprobs[:, :taken], filter_kl[:, :taken], alive[:, :taken], finished


def next_token(logits, params, generator=None, u=None):
    """One decode step's draw from ``[B, V]`` logits: ``(token, logp,
    filter_kl)``, each ``[B]`` (int64, float32, float32). ``logp`` is from
    the unfiltered tempered distribution (temperature 1 when greedy);
    ``filter_kl`` is KL(filtered || unfiltered) of the step, ``-log`` of the
    probability mass top-k/top-p kept (0 without filtering): how far the
    distribution the token was drawn from is from the one PPO trains.
    ``u``: the ``[B, 1]`` uniform numbers to draw with (default: from
    ``generator``)."""
    logits = logits.float()
    none = logits.new_zeros(logits.shape[0])
    if params.temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1), none
    scaled = logits / params.temperature if params.temperature != 1 else logits
    logp = scaled.log_softmax(-1)
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab or params.top_p < 1:
        allowed, ids = _candidates(scaled, params.top_k, params.top_p)
        token = ids.gather(-1, _inverse_cdf(allowed.softmax(-1), generator, u))
        filter_kl = (scaled.logsumexp(-1) - allowed.logsumexp(-1)).clamp(min=0)
    else:
        token, filter_kl = _inverse_cdf(logp.exp(), generator, u), none
    return token.squeeze(-1), logp.gather(-1, token).squeeze(-1), filter_kl


def _candidates(scaled, top_k, top_p):
    """The tokens top-k and top-p allow: ``[B, K]`` logits, sorted in
    decreasing order with the excluded ones at -inf, and their ``[B, K]``
    token ids (``K = top_k``, or ``V`` when top-k is off). Top-k keeps
    exactly ``top_k`` tokens (ties broken by ``torch.topk``); top-p then keeps
    the smallest prefix whose probability (renormalized after top-k) reaches
    ``top_p``, at least one token."""
    if 0 < top_k < scaled.shape[-1]:
        values, ids = scaled.topk(top_k, dim=-1)
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    if top_p < 1:
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        values = values.masked_fill(before >= top_p, float("-inf"))
    return values, ids


def _inverse_cdf(probs, generator, u=None):
    """``[B, 1]`` int64 index of one draw per row from ``[B, K]`` probabilities
    (non-negative, any positive sum): one uniform number per row (``u``, or
    drawn from ``generator``), located in the cumulative sums."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if u is None:
        u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    else:
        u = u.to(probs.device, probs.dtype)
    index = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total; the last entry with a positive
    # probability is then the right answer (never a zero-probability one).
    last = (cdf < total).sum(-1, keepdim=True)
    return torch.minimum(index, last)


def row_uniforms(seed, rows, steps, device="cpu"):
    """``[len(rows), steps]`` float32 uniform numbers in [0, 1): row ``i``'s
    from a generator seeded with ``(seed, rows[i])`` alone, so that a
    sequence's draws do not depend on which other rows share its batch: the
    same global row samples the same tokens at any batch split or world size."""
    out = torch.empty(len(rows), steps)
    for i, row in enumerate(rows):
        out[i] = torch.rand(steps, generator=torch.Generator().manual_seed(mix_seed(seed, row)))
    return out.to(device)


def mix_seed(*values):
    """A 63-bit seed from integers (SplitMix64 over each in turn): nearby
    inputs give unrelated seeds."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + (value & (2**64 - 1))) & (2**64 - 1)
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        state = z ^ (z >> 31)
    return state >> 1


def _assemble(prompt_ids, prompt_mask, tokens, logprobs, filter_kl, alive, finished):
    """The :class:`Rollout` of a decoded batch, built outside inference mode:
    new tensors (torch.cat, clone), not inference tensors, so autograd may
    save them (an embedding lookup of ``sequences`` does)."""
    batch, prompt_len = prompt_ids.shape
    no_response = torch.zeros(batch, prompt_len, dtype=torch.bool, device=prompt_ids.device)
    return Rollout(
        sequences=torch.cat([prompt_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, alive], dim=1),
        response_mask=torch.cat([no_response, alive], dim=1),
        sampler_logprobs=torch.cat([no_response.float(), logprobs], dim=1),
        filter_kl=torch.cat([no_response.float(), filter_kl], dim=1),
        finished=finished.clone(),
        prompt_length=prompt_len,
    )
