"""Helpers shared by test modules (a test module never imports another).

* op tests: backends to run, float64 comparison, poisoned outputs (random op
  inputs: tests/inputs.py);
* engine tests: a toy world (:func:`make_engine`) and bitwise comparison;
* pipeline tests: runs stopped at a step, run-folder readers, two-rank
  ``torchrun`` (their fixtures, ``workspace`` and ``full_sft``, are in
  tests/pipeline/conftest.py).

Heavy imports (transformers, the pipeline) happen inside the helpers that
need them.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rlhf_engine.ops import registry

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Unit roundoff of each dtype: the error of rounding a float64 result to it.
ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Float32-accumulated results against float64 (issue #2): 1e-6 for float32
# inputs, 1e-5 for half-precision inputs (of the same rounded values).
RESULT_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def cpu_backends(op):
    """Backends that run ``op`` on CPU tensors here, as pytest params
    (triton under the interpreter, marked so it can be deselected)."""
    params = []
    for backend in ("torch", "cpu", "triton"):
        reason = registry.unavailable_reason(op, backend, torch.device("cpu"), torch.float32)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if backend == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def gpu_backends(op):
    """Backends that run ``op`` on CUDA tensors, as params marked ``cuda``."""
    return [pytest.param(b, marks=pytest.mark.cuda, id=f"gpu-{b}") for b in ("triton", "cuda", "torch")]


def device_of(backend):
    return "cuda" if backend.startswith("gpu-") else "cpu"


def rel_error(out, ref):
    """||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    diff = (out - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


def assert_close(out, ref, tol, what="output"):
    """Relative error of ``out`` against the float64 ``ref`` is at most ``tol``;
    NaN anywhere in ``out`` where ``ref`` is finite fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all(), f"{what}: non-finite values where the reference is finite"
    assert torch.isnan(out[torch.isnan(ref)]).all(), f"{what}: reference NaNs not reproduced"
    err = rel_error(out[finite], ref[finite])
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_rounded_close(out, ref, what="output", slack=0.0):
    """``out`` (bf16/fp16) is float32 math rounded once: within one unit of
    rounding of the float64 ``ref``, element by element (subnormals
    included), plus ``slack`` (an absolute allowance per element, e.g. for
    float32 cancellation the caller can bound)."""
    dtype = out.dtype
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = 2 * ROUNDOFF[dtype] * ref.abs() + tiny + slack
    bad = ~((out.double() - ref).abs() <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than a rounding, e.g. " \
        f"{out[bad][:3].tolist()} vs {ref[bad][:3].tolist()}"


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated uninitialised (torch.empty here, at::empty in
    C++) comes filled with NaN, so a kernel that skips writing an output
    element fails the comparison instead of passing on zeroed memory."""
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(det, warn_only=warn)


def fresh_generator():
    """A torch.Generator with a fresh seed; the seed is printed so that a
    failing test (pytest shows its output) can be replayed with
    RLHF_ENGINE_TEST_SEED."""
    seed = int(os.environ.get("RLHF_ENGINE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Engine tests: a toy world (a tiny Llama policy, a reward that counts one
# token) small enough for a PPO iteration in a fraction of a second.

VOCAB, TARGET, PAD, EOS = 24, 7, 0, 1


class Tokenizer:
    """The two ids the engine needs from a tokenizer (prompts are given as ids)."""

    pad_token_id, eos_token_id = PAD, EOS


class TargetCount(torch.nn.Module):
    """A toy reward model: the fraction of real tokens equal to ``TARGET``
    (prompts never contain it), optionally NaN."""

    def __init__(self, nan=False):
        super().__init__()
        self.nan = nan
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        hits = ((input_ids == TARGET) & attention_mask.bool()).float().sum(-1) / 8.0
        return hits * float("nan") if self.nan else hits


def tiny_policy(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=2)
    return LlamaForCausalLM(config)


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def make_engine(reward=None, **overrides):
    from rlhf_engine.engine import EngineConfig, RLHFEngine

    settings = dict(max_new_tokens=8, stop_at_eos=False, mini_batch_size=4, ppo_epochs=2, lr=3e-3,
                    critic_lr=3e-3, critic_init="policy", kl_coef=0.05, seed=0)
    settings.update(overrides)
    if settings.get("advantage_estimator", "gae") != "gae":
        del settings["critic_init"]  # no critic to build
    return RLHFEngine(tiny_policy(), Tokenizer(), EngineConfig(**settings), reward_model=reward or TargetCount())


def same_bits(a, b):
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8),
                            b.detach().cpu().reshape(-1).view(torch.uint8)))


# ---------------------------------------------------------------------------
# Pipeline tests: a workspace of data files and tiny model folders, runs of
# the command stopped at a given step, and what a run folder holds.


def interrupt_at(monkeypatch, stage, step, signum=signal.SIGINT):
    """Send SIGINT (as Ctrl-C does), or ``signum``, once ``stage`` has recorded ``step``."""
    from rlhf_engine.pipeline.run import Run

    record = Run.record

    def record_then_interrupt(self, stage_, step_, metrics):
        record(self, stage_, step_, metrics)
        if (stage_, step_) == (stage, step):
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Run, "record", record_then_interrupt)


def weights(path, loader=None):
    """The state dict of the model saved in ``path`` (``AutoModelForCausalLM`` by default)."""
    if loader is None:
        from transformers import AutoModelForCausalLM as loader
    return loader.from_pretrained(path).state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def sft_args(workspace):
    return ["sft", "--model", str(workspace / "lm"), "--train_file", str(workspace / "demos.jsonl"),
            "--max_steps", "6", "--batch_size", "4", "--eval_every", "2", "--save_every", "2"]


def cut(args, out, monkeypatch, stage, step, signum=signal.SIGINT):
    """Run ``args`` in ``out``, stopped by ``signum`` once ``stage`` has recorded ``step``."""
    from rlhf_engine import cli

    with monkeypatch.context() as patch:
        interrupt_at(patch, stage, step, signum)
        assert cli.main(args + ["--out", str(out)]) == 128 + signum


def rows(out, stage=None):
    """metrics.jsonl's rows (of ``stage``); only whole lines (another process may be writing it)."""
    text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
    found = [json.loads(line) for line in text.split("\n")[:-1]]
    return [row for row in found if stage is None or row["stage"] == stage]


def steps(out, stage=None):
    return [row["step"] for row in rows(out, stage)]


def saved_steps(root):
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))


def linear_task(model_seed=0):
    """A least-squares problem: 12 fixed examples, a [3 -> 1] linear model."""
    from rlhf_engine.pipeline.training import StepOutput

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=gen), torch.randn(12, generator=gen)
    torch.manual_seed(model_seed)
    model = torch.nn.Linear(3, 1)

    def step(indices):
        pred = model(x[indices]).squeeze(-1)
        return StepOutput(((pred - y[indices]) ** 2).sum(), len(indices), len(indices))

    return model, step, lambda: {"eval_loss": 0.0}


def torchrun(args, timeout=400):
    """``python -m torch.distributed.run --nproc_per_node=2 -m rlhf_engine.cli ARGS``: its exit status and output."""
    from tests.ranks import REPO, free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "rlhf_engine.cli", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr
