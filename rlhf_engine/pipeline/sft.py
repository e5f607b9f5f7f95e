"""The SFT stage: supervised fine-tuning of a causal LM on demonstrations.

Loss: the mean negative log-likelihood of the *response* tokens of a batch
(EOS included; prompt tokens and padding are context only), computed by
:func:`rlhf_engine.models.causal_lm_logprobs` through the chunked linear
head, so the ``[B, L, V]`` logits never exist. Rows are packed when the
model's attention supports it (see :mod:`rlhf_engine.pipeline.batching`),
padded otherwise. The optimisation is the shared loop of
:mod:`rlhf_engine.pipeline.training`.
"""
import dataclasses
from typing import Callable, Dict, Optional, Sequence

import torch

from rlhf_engine.models import causal_lm_logprobs
from rlhf_engine.options import option
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.data import Demonstration, Encoded, record_texts
from rlhf_engine.pipeline.run import Run, load_causal_lm, train_stage
from rlhf_engine.pipeline.sources import load_records
from rlhf_engine.pipeline.training import (StepOutput, TrainConfig, evaluate_sums, model_device, split_and_prepare,
                                          train_loop)


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """The SFT stage's options (see :class:`TrainConfig`)."""

    packing: bool = option(True, "Pack several examples into one row when the model's attention implementation "
                                 "supports packed sequences (flash_attention_2/3); padding otherwise.")


def response_nll(model, batch: batching.TokenBatch) -> torch.Tensor:
    """0-d float32 sum of ``-log p`` over ``batch.response_mask``'s tokens."""
    logp = causal_lm_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask,
                              position_ids=batch.position_ids)
    return -logp.sum()


def sft_loss(model, batch: batching.TokenBatch) -> torch.Tensor:
    """0-d float32 mean NLL of the response tokens of ``batch``."""
    return response_nll(model, batch) / batch.response_mask.sum().clamp(min=1)


def _rows(examples):
    return [(example.prompt_ids, example.responses[0]) for example in examples]


def collate_examples(examples: Sequence[Encoded], pad_id: int, packed: bool) -> batching.TokenBatch:
    """The model batch of encoded demonstrations (:func:`batching.collate_rows`)
    whose ``response_mask`` keeps only each example's targets: all its
    response tokens, or those its ``masks`` mark (the assistant turns of a
    multi-turn conversation)."""
    batch = batching.collate_rows(_rows(examples), pad_id, packed)
    if all(example.masks is None for example in examples):
        return batch
    targets = torch.zeros_like(batch.response_mask)
    row, column = 0, 0
    for example in examples:
        response = example.responses[0]
        mask = [True] * len(response) if example.masks is None else example.masks[0]
        start = column + len(example.prompt_ids)
        targets[row, start:start + len(response)] = torch.tensor(mask, dtype=torch.bool)
        row, column = (0, start + len(response)) if packed else (row + 1, 0)
    return batch._replace(response_mask=batch.response_mask & targets)


def train_sft(model, tokenizer, train_examples: Sequence[Demonstration],
              eval_examples: Optional[Sequence[Demonstration]], config: SFTConfig, *,
              on_step: Optional[Callable[[dict], None]] = None,
              stop: Optional[Callable[[], bool]] = None, checkpoints=None, resume: bool = False) -> dict:
    """Fine-tune the causal LM ``model`` in place on demonstrations.

    Args:
        model: a HuggingFace causal LM (on the device to train on).
        tokenizer: its tokenizer (prompts encoded by
            :func:`rlhf_engine.pipeline.data.encode_prompt`).
        train_examples, eval_examples: :class:`Demonstration` records;
            ``eval_examples`` None holds out ``config.eval_fraction`` of the
            training ones (an empty list: no evaluation).
        config: :class:`SFTConfig`.
        on_step, stop, checkpoints, resume: see
            :func:`rlhf_engine.pipeline.training.train_loop` (data-parallel
            under torch.distributed; ``model`` is then sharded in place).

    Returns:
        :func:`train_loop`'s metrics (``eval_loss``: mean response-token NLL
        of the held-out set) plus ``train_examples``, ``eval_examples``,
        ``dropped``, ``truncated`` (the length policy, both sets) and
        ``packed``.
    """
    if not isinstance(config, SFTConfig):
        raise ValueError(f"config must be an SFTConfig, got {type(config).__name__}")
    train, held, info = split_and_prepare(tokenizer, train_examples, eval_examples, config, (Demonstration,),
                                          names=("train_examples", "eval_examples"))
    device = model_device(model)
    packed = config.packing and batching.supports_packing(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(examples):
        return collate_examples(examples, pad_id, packed).to(device)

    def step(indices):
        batch = collate([train[i] for i in indices])
        return StepOutput(response_nll(model, batch), batch.response_mask.sum(), batch.num_tokens)

    def evaluate():
        def measure(examples):
            batch = collate(examples)
            return response_nll(model, batch), batch.response_mask.sum()

        if not held:
            return {}
        nll, count = evaluate_sums(batching.chunks(held, config.batch_size), measure, device)
        return {"eval_loss": nll / count}

    metrics = train_loop(model, config, len(train), step, evaluate, on_step=on_step, stop=stop,
                         checkpoints=checkpoints, resume=resume)
    return {**metrics, **info, "packed": packed}


def run_sft_command(run: Run, data, config) -> Dict:
    """``rlhf-engine sft``: fine-tune ``data.model`` on ``data.train_file``
    (:class:`~rlhf_engine.pipeline.config.SFTData`, :class:`~rlhf_engine.pipeline.sft.SFTConfig`)."""
    def read(path):
        return load_records(path, "demonstrations", split=data.split, columns=data.columns)

    train = read(data.train_file)
    held = read(data.eval_file) if data.eval_file else None
    texts = [text for record in train for text in record_texts(record)]
    model, tokenizer = load_causal_lm(data.model, texts=texts, vocab_size=data.vocab_size, seed=data.model_seed,
                                      role="--model")
    result = train_stage(run, "sft", model, tokenizer, train_sft, train, held, config)
    return {**result, "model": str(run.model_dir("sft"))}
