"""The engine and TRL's PPO trainer on the same work, in alternating runs.

One machine, one session: ``--pairs`` times per size and variant,
``rlhf-engine bench ppo`` then ``benchmarks/engine/trl_ppo.py`` (in the TRL
venv, see its docstring), each a fresh process with the same thread count.
On a shared or noisy machine single runs swing by a third; pairs run back to
back see the same conditions, so the report gives each pair's ratio and their
median.

Variants (``--variants``): ``full`` (full fine-tuning, float32), ``lora``
(LoRA of rank ``--lora_r`` with the engine's default alpha and targets: the
engine's ``--lora_r``, TRL's ``peft_config``; what each side then trains
differs, see trl_ppo.py), and ``full_bf16`` / ``lora_bf16`` (the engine's
``--dtype bfloat16``, TRL's ``--bf16``: bf16 autocast on float32 weights).

    python benchmarks/engine/compare_trl.py --sizes small tiny --pairs 4 --threads 2 \\
        --trl-python /tmp/trlvenv/bin/python --out benchmarks/results/amd-epyc/ppo_vs_trl.json
    python benchmarks/engine/compare_trl.py --sizes medium --variants full lora --pairs 1 --iterations 2 \\
        --raw benchmarks/results/intel-xeon/medium --out benchmarks/results/intel-xeon/medium/pairs.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("full", "lora", "full_bf16", "lora_bf16")


def run(command, threads):
    """Run ``command`` (its last argument the JSON path) and return its report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(Path(command[-1]).read_text())


def variant_flags(variant, lora_r):
    """``(engine flags, TRL flags)`` of ``variant`` (one of :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rank = ["--lora_r", str(lora_r)] if variant.startswith("lora") else []
    bf16 = variant.endswith("bf16")
    return rank + (["--dtype", "bfloat16"] if bf16 else []), rank + (["--bf16"] if bf16 else [])


def compare(size, variant, pairs, threads, iterations, warmup, lora_r, trl_python, folder):
    """``pairs`` alternating runs of both sides at ``size`` and ``variant``: a summary dict."""
    engine_flags, trl_flags = variant_flags(variant, lora_r)
    counts = ["--size", size, "--iterations", str(iterations), "--warmup", str(warmup)]
    rows = []
    for pair in range(pairs):
        name = f"{size}_{variant}_{pair}.json"
        engine = run([sys.executable, "-m", "rlhf_engine.cli", "bench", "ppo", *counts, *engine_flags,
                      "--json", str(folder / f"engine_{name}")], threads)
        trl = run([trl_python, "benchmarks/engine/trl_ppo.py", *counts, *trl_flags, "--threads", str(threads),
                   "--json", str(folder / f"trl_{name}")], threads)
        rows.append({"engine_seconds": engine["seconds_per_iteration"], "engine_phases": engine["phases"],
                     "engine_peak_rss_mib": engine["peak_rss_mib"], "engine_loadavg_1min": engine["loadavg_1min"],
                     "trl_seconds": trl["seconds_per_iteration"], "trl_phases": trl["phases"],
                     "trl_peak_rss_mib": trl["peak_rss_mib"], "trl_loadavg_1min": trl["loadavg_1min"],
                     "speedup": trl["seconds_per_iteration"] / engine["seconds_per_iteration"]})
        print(f"{size} {variant} pair {pair}: engine {rows[-1]['engine_seconds']:.3f} s, "
              f"TRL {rows[-1]['trl_seconds']:.3f} s, speedup {rows[-1]['speedup']:.2f}", flush=True)
    median = statistics.median
    return {"size": size, "variant": variant, "lora_r": lora_r if variant.startswith("lora") else 0,
            "pairs": rows, "threads": threads, "iterations_per_run": iterations, "warmup_per_run": warmup,
            "median_engine_seconds": median(r["engine_seconds"] for r in rows),
            "median_trl_seconds": median(r["trl_seconds"] for r in rows),
            "median_speedup": median(r["speedup"] for r in rows),
            "max_engine_peak_rss_mib": max(r["engine_peak_rss_mib"] for r in rows),
            "max_trl_peak_rss_mib": max(r["trl_peak_rss_mib"] for r in rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=["tiny", "small", "medium"])
    parser.add_argument("--variants", nargs="+", default=["full"], choices=VARIANTS)
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the lora variants.")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4, help="Measured iterations per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up iterations per run, not measured.")
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    parser.add_argument("--raw", default=None, help="Keep each run's JSON report in this folder (default: dropped).")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for flag, value, low in (("--lora_r", args.lora_r, 1), ("--pairs", args.pairs, 1), ("--threads", args.threads, 1),
                             ("--iterations", args.iterations, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"{flag} must be an int >= {low}, got {value}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.raw or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        report = {f"{size}_{variant}": compare(size, variant, args.pairs, args.threads, args.iterations, args.warmup,
                                               args.lora_r, args.trl_python, folder)
                  for size in args.sizes for variant in args.variants}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
