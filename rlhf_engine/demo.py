"""Every backend of the ops on built-in sizes: error against float64, time and
peak memory, side by side with eager PyTorch.

    python -m rlhf_engine.demo [--device cpu|cuda] [--quick]

A first look at what the kernels do on this machine (the engine's pipeline
will replace this as the project's main job). Full measurements live in
benchmarks/.
"""
import argparse

import torch

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


if __name__ == "__main__":
    main()
