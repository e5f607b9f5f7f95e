"""Every backend of the ops on built-in sizes: error against float64, time and
peak memory (token_logprobs side by side with eager PyTorch; the RL ops
against their float64 reference).

    python -m rlhf_engine.demo [--device cpu|cuda] [--quick]

A first look at what the kernels do on this machine (the engine's pipeline
will replace this as the project's main job). Full measurements live in
benchmarks/.
"""
import argparse

import torch

from rlhf_engine import ops
from rlhf_engine.ops import registry, token_logprobs
from rlhf_engine.profiling import median_time, peak_memory

BACKENDS = ("torch", "cpu", "triton", "cuda")
SIZES = {
    "cpu": [((2048, 32000), torch.float32), ((2048, 32000), torch.bfloat16), ((128, 151936), torch.bfloat16)],
    "cuda": [((16384, 152064), torch.bfloat16), ((4096, 32000), torch.float32)],
}
QUICK = [((256, 32000), torch.float32), ((256, 32000), torch.bfloat16)]


def eager_logprobs(logits, labels):
    """The reference everyone starts from: log_softmax then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None])[:, 0]


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_case(shape, dtype, device, repeats):
    """Rows of the table for one (shape, dtype): eager first, then each backend."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    labels = torch.randint(0, shape[1], shape[:1], generator=gen).to(device)
    x64 = logits.double().cpu().requires_grad_()
    ref = torch.log_softmax(x64, -1).gather(-1, labels.cpu()[:, None])[:, 0]
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)

    candidates = [("eager", lambda x: eager_logprobs(x, labels))]
    for backend in BACKENDS:
        reason = registry.unavailable_reason("token_logprobs", backend, logits.device, dtype)
        candidates.append((backend, reason or (lambda x, b=backend: token_logprobs(x, labels, backend=b))))

    rows = []
    for name, fn in candidates:
        if isinstance(fn, str):
            rows.append((name, None, None, None, None, fn))
            continue
        x = logits.clone().requires_grad_()

        def step():
            x.grad = None
            out = fn(x)
            out.sum().backward()
            return out

        out, memory = peak_memory(step, device)  # also the warm-up
        seconds = median_time(step, device, repeats=repeats, warmup=0)
        rows.append((name, _rel(out.cpu(), ref), _rel(x.grad.cpu(), ref_grad), seconds, memory.peak_bytes, ""))
    return rows


def rl_cases(b, t):
    """name -> (op name, op, args, kwargs, index of the differentiated arg or
    None): the RL ops on [b, t] inputs as PPO produces them."""
    gen = torch.Generator().manual_seed(0)
    normal = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    mask = torch.rand(b, t, generator=gen) > 0.2
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + 0.1 * normal(b, t)
    return {
        "kl_penalty k3": ("kl_penalty", ops.kl_penalty, (logp, old), dict(estimator="k3"), 0),
        "kl_shaped_rewards": ("kl_shaped_rewards", ops.kl_shaped_rewards, (normal(b), logp, old, mask),
                              dict(kl_coef=0.05), None),
        "gae": ("gae", ops.gae, (normal(b, t), normal(b, t), mask), dict(gamma=1.0, lam=0.95), None),
        "masked_whiten": ("masked_whiten", ops.masked_whiten, (normal(b, t), mask), {}, None),
        "group_advantages": ("group_advantages", ops.group_advantages, (normal(b * t), 16), {}, None),
        "ppo_policy_loss": ("ppo_policy_loss", ops.ppo_policy_loss, (logp, old, normal(b, t), mask),
                            dict(clip_high=0.28), 0),
        "ppo_value_loss": ("ppo_value_loss", ops.ppo_value_loss, (normal(b, t), normal(b, t), normal(b, t), mask),
                           {}, 0),
        "pairwise_reward_loss": ("pairwise_reward_loss", ops.pairwise_reward_loss, (normal(b * t), normal(b * t)),
                                 {}, 0),
    }


def _call(fn, args, kwargs, grad_arg, backend, dtype, device):
    """(first output, gradient of its sum w.r.t. args[grad_arg] or None)."""
    args = [a.to(device, dtype, copy=True) if torch.is_tensor(a) and a.is_floating_point() else
            a.to(device) if torch.is_tensor(a) else a for a in args]
    if grad_arg is not None:
        args[grad_arg].requires_grad_()
    out = fn(*args, backend=backend, **kwargs)
    main = out[0] if isinstance(out, tuple) else out
    if grad_arg is None:
        return main, None
    main.sum().backward()
    return main, args[grad_arg].grad


def run_rl_ops(device, repeats, b=512, t=4096):
    print(f"RL ops on [{b}, {t}] float32 (forward + backward where differentiable) on {device}; the error of a loss\n"
          "is relative to its value, a mean of mixed-sign terms (float32 inputs alone move it by ~1e-6);\n"
          "peak memory includes the copies of the inputs each call makes\n")
    header = f"{'op':>22} {'backend':>8} {'err out':>9} {'err grad':>9} {'ms':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for name, (op, fn, args, kwargs, grad_arg) in rl_cases(b, t).items():
        ref, ref_grad = _call(fn, args, kwargs, grad_arg, "torch", torch.float64, "cpu")
        for backend in BACKENDS:
            reason = registry.unavailable_reason(op, backend, torch.device(device), torch.float32)
            if reason:
                print(f"{name:>22} {backend:>8}  skipped: {reason}")
                continue
            step = lambda: _call(fn, args, kwargs, grad_arg, backend, torch.float32, device)  # noqa: E731
            (out, grad), memory = peak_memory(step, device)
            seconds = median_time(step, device, repeats=repeats, warmup=0)
            gerr = f"{_rel(grad.cpu(), ref_grad):9.1e}" if grad is not None else f"{'-':>9}"
            print(f"{name:>22} {backend:>8} {_rel(out.cpu(), ref):9.1e} {gerr} {seconds * 1e3:9.2f} "
                  f"{memory.peak_bytes / 2**20:8.1f}")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a few seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SIZES[torch.device(args.device).type]
    print(f"token_logprobs, forward + backward, on {args.device} "
          f"(error: relative to float64 log_softmax; peak: memory beyond the inputs)\n")
    header = f"{'shape':>16} {'dtype':>9} {'backend':>8} {'err logp':>9} {'err grad':>9} {'ms':>9} {'speed-up':>8} " \
             f"{'peak MB':>8} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for shape, dtype in sizes:
        rows = run_case(shape, dtype, args.device, args.repeats)
        base_time, base_peak = rows[0][3], rows[0][4]
        for name, err, gerr, seconds, peak, note in rows:
            lead = f"{'x'.join(map(str, shape)):>16} {str(dtype).replace('torch.', ''):>9} {name:>8}"
            if note:
                print(f"{lead}  skipped: {note}")
                continue
            print(f"{lead} {err:9.1e} {gerr:9.1e} {seconds * 1e3:9.2f} {base_time / seconds:7.2f}x "
                  f"{peak / 2**20:8.1f} {peak / base_peak:9.2f}")
        print()
    run_rl_ops(args.device, args.repeats, *((64, 512) if args.quick else (512, 4096)))


if __name__ == "__main__":
    main()
