"""The engine and TRL's PPO trainer on the same work, in alternating runs.

One machine, one session: ``--pairs`` times per size, ``rlhf-engine bench ppo``
then ``benchmarks/engine/trl_ppo.py`` (in the TRL venv, see its docstring),
each a fresh process with the same thread count. On a shared or noisy
machine single runs swing by a third; pairs run back to back see the same
conditions, so the report gives each pair's ratio and their median.

    python benchmarks/engine/compare_trl.py --sizes small tiny --pairs 4 --threads 2 \\
        --trl-python /tmp/trlvenv/bin/python --out benchmarks/results/amd-epyc/ppo_vs_trl.json
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


def run(command, threads):
    """Run ``command`` (its last argument the JSON path) and return its report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(command[-1]).read_text())


def compare(size, pairs, threads, iterations, trl_python, folder):
    """``pairs`` alternating runs of both sides at ``size``: a summary dict."""
    rows = []
    for pair in range(pairs):
        engine = run([sys.executable, "-m", "rlhf_engine.cli", "bench", "ppo", "--size", size, "--iterations",
                      str(iterations), "--json", str(folder / f"engine_{size}_{pair}.json")], threads)
        trl = run([trl_python, "benchmarks/engine/trl_ppo.py", "--size", size, "--iterations", str(iterations),
                   "--threads", str(threads), "--json", str(folder / f"trl_{size}_{pair}.json")], threads)
        rows.append({"engine_seconds": engine["seconds_per_iteration"], "engine_phases": engine["phases"],
                     "engine_peak_rss_mib": engine["peak_rss_mib"], "trl_seconds": trl["seconds_per_iteration"],
                     "trl_peak_rss_mib": trl["peak_rss_mib"],
                     "speedup": trl["seconds_per_iteration"] / engine["seconds_per_iteration"]})
        print(f"{size} pair {pair}: engine {rows[-1]['engine_seconds']:.3f} s, TRL {rows[-1]['trl_seconds']:.3f} s, "
              f"speedup {rows[-1]['speedup']:.2f}", flush=True)
    median = statistics.median
    return {"size": size, "pairs": rows, "threads": threads, "iterations_per_run": iterations,
            "median_engine_seconds": median(r["engine_seconds"] for r in rows),
            "median_trl_seconds": median(r["trl_seconds"] for r in rows),
            "median_speedup": median(r["speedup"] for r in rows),
            "max_engine_peak_rss_mib": max(r["engine_peak_rss_mib"] for r in rows),
            "max_trl_peak_rss_mib": max(r["trl_peak_rss_mib"] for r in rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=["tiny", "small"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4, help="Measured iterations per run (1 warm-up besides).")
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        report = {size: compare(size, args.pairs, args.threads, args.iterations, args.trl_python, Path(folder))
                  for size in args.sizes}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
