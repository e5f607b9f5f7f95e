"""models.modes and gradient checkpointing: a model trained under
``training_without_dropout`` computes exactly its eval-mode function, for
families whose dropout lives in modules (GPT-2), in attention probabilities
(Llama, Qwen3 ``attention_dropout``) or in LoRA-style sub-modules, with and
without gradient checkpointing; and checkpointing gives the same gradients
as no checkpointing through every model path the engine and the SFT/RM
stages use (log-probs, values, scores), the pruned last layer included."""
import pytest
import torch
import transformers

from rlhf_engine.models import causal_lm_logprobs, sequence_scores, token_values
from rlhf_engine.models.modes import checkpointed_layers, training_without_dropout
from tests.helpers import assert_close

VOCAB = 40


def build(family, cls_kind="lm", dropout=0.3, seed=0):
    """A tiny model of ``family`` with every dropout it has set to ``dropout``."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                         summary_first_dropout=dropout, pad_token_id=0, num_labels=1)
        classes = (transformers.GPT2LMHeadModel, transformers.GPT2ForSequenceClassification)
    else:
        config_class, classes = {
            "llama": (transformers.LlamaConfig, (transformers.LlamaForCausalLM,
                                                 transformers.LlamaForSequenceClassification)),
            "qwen2": (transformers.Qwen2Config, (transformers.Qwen2ForCausalLM,
                                                 transformers.Qwen2ForSequenceClassification)),
            "qwen3": (transformers.Qwen3Config, (transformers.Qwen3ForCausalLM,
                                                 transformers.Qwen3ForSequenceClassification)),
        }[family]
        config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              attention_dropout=dropout, pad_token_id=0, num_labels=1)
    model = classes[0 if cls_kind == "lm" else 1](config)
    return model.train()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    score = mask.clone()
    score[:, :6] = False
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0), score


FAMILIES = ["gpt2", "llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_without_dropout_is_the_eval_function(family, checkpointing):
    model = build(family)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, mask, pos, score = batch()
    with torch.no_grad():
        model.eval()
        reference = causal_lm_logprobs(model, ids, mask, score, position_ids=pos)
        model.train()
        noisy = causal_lm_logprobs(model, ids, mask, score, position_ids=pos)
    assert not torch.equal(noisy, reference)  # the model has dropout: the test can fail
    modes = {name: m.training for name, m in model.named_modules()}
    with training_without_dropout(model):
        if checkpointing:
            assert checkpointed_layers(model) and all(m.training for m in checkpointed_layers(model))
        for _ in range(2):
            trained = causal_lm_logprobs(model, ids, mask, score, position_ids=pos)
            assert torch.equal(trained.detach(), reference)
        trained.sum().backward()
    assert {name: m.training for name, m in model.named_modules()} == modes  # restored
    dropouts = [v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]
    assert all(v in (0.3, 0.0) for v in dropouts) and 0.3 in dropouts + [m.p for m in model.modules()
                                                                         if isinstance(m, torch.nn.Dropout)]


def _grads(model, loss_fn, checkpointing, reentrant):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    with training_without_dropout(model):
        loss = loss_fn(model)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("path", ["logprobs", "values", "scores"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_gradients_of_the_plain_run(family, path, reentrant):
    """The pruned last layer (models.last_layer) used to crash the recompute
    (CheckpointError, or a shape mismatch when reentrant)."""
    model = build(family, "lm" if path == "logprobs" else "cls", dropout=0.0)
    ids, mask, pos, score = batch()
    weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    loss_fn = {
        "logprobs": lambda m: (causal_lm_logprobs(m, ids, mask, score, position_ids=pos) * weights).sum(),
        "values": lambda m: (token_values(m, ids, mask, pos, from_position=6) * weights * score).sum(),
        "scores": lambda m: (sequence_scores(m, ids, mask, pos) * weights[:, 0]).sum(),
    }[path]
    plain_loss, plain = _grads(model, loss_fn, False, reentrant)
    loss, grads = _grads(model, loss_fn, True, reentrant)
    assert_close(loss, plain_loss.double(), 1e-6, "loss")
    assert plain.keys() == grads.keys() and plain
    for name, grad in plain.items():
        assert_close(grads[name], grad.double(), 1e-5, name)
