"""The report of a built-in pipeline run: ``report.md``, its PNG plots and
``summary.json``, drawn from the run folder's ``metrics.jsonl`` and the
pipeline's summary.

Plots (matplotlib, Agg backend, so no display is needed):

- ``sft_loss.png``: SFT training loss per step and the held-out loss;
- ``rm_accuracy.png``: the reward model's held-out accuracy against the gold
  preferences, and its training-batch accuracy;
- ``ppo.png``: PPO's reward-model score, KL to the reference (with the
  configured bound) and gold score, over iterations;
- ``overoptimization.png``: reward-model score and gold score on the
  evaluation prompts over iterations, with the KL penalty and without it;
- ``gold_reward.png`` (``--reward gold``): the same for PPO against the
  reward model and PPO against the gold reward.
"""
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from rlhf_engine.pipeline.run import METRICS_FILE

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOTS = {"sft": "sft_loss.png", "rm": "rm_accuracy.png", "ppo": "ppo.png", "overoptimization": "overoptimization.png"}
GOLD_PLOT = "gold_reward.png"  # only with --reward gold
GOLD_STAGES = (("ppo", "reward-model reward"), ("ppo_gold", "gold reward"))


def read_metrics(folder) -> List[Dict]:
    """The rows of ``folder/metrics.jsonl`` in order; a (stage, step)
    recorded twice (a resumed run repeating steps after its checkpoint)
    keeps its last row, at its first row's place."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["stage"], row["step"])] = row
    return list(rows.values())


def series(rows: Sequence[Dict], stage: str, key: str) -> Tuple[List[int], List[float]]:
    """``(steps, values)`` of metric ``key`` in ``stage``'s rows that have it."""
    points = [(row["step"], row[key]) for row in rows
              if row["stage"] == stage and isinstance(row.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _window(n: int) -> int:
    return max(1, n // 20)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sft(rows, path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps, loss = series(rows, "sft", "loss")
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="batch loss")
    ax.plot(steps, moving_average(loss, _window(len(loss))), color="tab:blue", label="batch loss (moving mean)")
    eval_steps, eval_loss = series(rows, "sft", "eval_loss")
    ax.plot(eval_steps, eval_loss, "o-", color="tab:orange", label="held-out loss")
    ax.set(xlabel="step", ylabel="response-token NLL (nats)", title="SFT")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, path)


def plot_rm(rows, path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps, accuracy = series(rows, "rm", "accuracy")
    ax.plot(steps, moving_average(accuracy, _window(len(accuracy))), color="tab:blue",
            label="training batches (annotator labels, moving mean)")
    eval_steps, eval_accuracy = series(rows, "rm", "eval_accuracy")
    ax.plot(eval_steps, eval_accuracy, "o-", color="tab:orange", label="held-out pairs (gold preferences)")
    ax.set(xlabel="step", ylabel="pairwise accuracy", title="Reward model", ylim=(0.4, 1.0))
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_ppo(rows, path, kl_bound: float) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(6.4, 8), sharex=True)
    steps, score = series(rows, "ppo", "reward/score_mean")
    axes[0].plot(steps, score, color="tab:blue", alpha=0.3, lw=0.8)
    axes[0].plot(steps, moving_average(score, _window(len(score))), color="tab:blue", label="rollouts")
    probe_steps, probe_score = series(rows, "ppo", "probe/reward")
    axes[0].plot(probe_steps, probe_score, "o-", color="tab:orange", label="evaluation prompts")
    axes[0].set(ylabel="reward-model score")
    steps, kl = series(rows, "ppo", "kl/k1")
    axes[1].plot(steps, kl, color="tab:blue", alpha=0.3, lw=0.8)
    axes[1].plot(steps, moving_average(kl, _window(len(kl))), color="tab:blue", label="rollouts")
    probe_steps, probe_kl = series(rows, "ppo", "probe/kl")
    axes[1].plot(probe_steps, probe_kl, "o-", color="tab:orange", label="evaluation prompts")
    axes[1].axhline(kl_bound, color="tab:red", ls="--", label=f"bound {kl_bound:g}")
    axes[1].set(ylabel="KL to reference (nats/response)")
    probe_steps, gold = series(rows, "ppo", "probe/gold")
    axes[2].plot(probe_steps, gold, "o-", color="tab:green", label="evaluation prompts")
    axes[2].set(ylabel="gold score", xlabel="PPO iteration")
    for ax in axes:
        ax.legend(loc="best")
    axes[0].set_title("PPO against the reward model, KL penalty on")
    _save(fig, path)


def plot_overoptimization(rows, path, stages=(("ppo", "KL penalty on"), ("ppo_nokl", "KL penalty off"))) -> None:
    """Left: the reward-model and gold scores over iterations of each run;
    right: each run's path in (reward-model score, gold score): below the
    other run's path, the same proxy score buys less gold."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    gold_axis = left.twinx()
    for (stage, label), style in zip(stages, ("-", "--")):
        steps, reward = series(rows, stage, "probe/reward")
        gold_steps, gold = series(rows, stage, "probe/gold")
        left.plot(steps, reward, "o" + style, color="tab:blue", label=f"reward model, {label}")
        gold_axis.plot(gold_steps, gold, "s" + style, color="tab:green", label=f"gold, {label}")
        right.plot(reward, gold, "o" + style, label=label)
        if reward:
            right.annotate(str(steps[-1]), (reward[-1], gold[-1]), textcoords="offset points", xytext=(4, 4))
    left.set(xlabel="PPO iteration", title="Scores on the evaluation prompts")
    left.set_ylabel("reward-model score", color="tab:blue")
    gold_axis.set_ylabel("gold score", color="tab:green")
    handles = left.get_legend_handles_labels()[0] + gold_axis.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="lower right")
    right.set(xlabel="reward-model score", ylabel="gold score", title="Gold score per reward-model score "
                                                                       "(labels: last iteration)")
    right.legend()
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _cell(text: str) -> str:
    """A response as a markdown table cell: quoted, escapes visible, no pipe breaking the row."""
    return json.dumps(text, ensure_ascii=False).replace("|", "\\|")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_markdown(summary: Dict, examples: Sequence[Dict] = ()) -> str:
    """The text of ``report.md`` from the pipeline's ``summary`` (see
    :func:`write_report`) and a few example responses
    (``{"prompt", "sft", "ppo", "sft_gold", "ppo_gold"}``)."""
    lo, hi = summary["win_rate_ci_low"], summary["win_rate_ci_high"]
    verdict = ("the whole interval is above 50%: the gold judge prefers the PPO policy" if lo > 0.5 else
               "the interval includes or is below 50%: no clear preference")
    kl_ok = "within" if summary["mean_kl"] <= summary["kl_bound"] else "ABOVE"
    nokl = summary.get("nokl", {})
    lines = [
        "# InstructGPT in miniature: SFT -> reward model -> PPO",
        "",
        f"**The gold judge prefers PPO over SFT on {summary['win_n']} held-out prompts: win rate "
        f"{_pct(summary['win_rate'])}, 95% interval [{_pct(lo)}, {_pct(hi)}]** ({summary['wins']} wins, "
        f"{summary['ties']} ties, {summary['losses']} losses; a tie counts half): {verdict}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| reward model held-out accuracy (gold preferences) | {_pct(summary['rm_accuracy'])} |",
        f"| mean gold score, SFT / PPO (held-out prompts) | {summary['sft_gold']:.3f} / {summary['ppo_gold']:.3f} |",
        f"| mean KL of PPO to the SFT reference (nats per response) | {summary['mean_kl']:.3f} "
        f"({kl_ok} the bound {summary['kl_bound']:g}) |",
        f"| wall time | {summary['wall_seconds']:.0f} s |",
        "",
        "## SFT",
        "",
        f"![SFT loss]({PLOTS['sft']})",
        "",
        "## Reward model",
        "",
        f"Held-out accuracy against the gold judge's preferences: {_pct(summary['rm_accuracy'])}.",
        "",
        f"![Reward model accuracy]({PLOTS['rm']})",
        "",
        "## PPO",
        "",
        f"![PPO]({PLOTS['ppo']})",
        "",
        "## Over-optimisation",
        "",
    ]
    if nokl:
        lines += [
            "A second, short PPO run from the SFT model with the KL penalty off (kl_coef 0). On the evaluation "
            f"prompts the reward model's score went from {nokl['reward_start']:.3f} to {nokl['reward_end']:.3f} "
            f"while the gold score went from {nokl['gold_start']:.3f} to {nokl['gold_end']:.3f}; the policy "
            f"drifted {nokl['kl_end']:.2f} nats per response from the reference.",
            "",
            f"![Over-optimisation]({PLOTS['overoptimization']})",
            "",
        ]
    lines += _gold_reward_section(summary)
    if examples:
        lines += ["## Examples (held-out prompts)", "", "| prompt | SFT | gold | PPO | gold |",
                  "| --- | --- | --- | --- | --- |"]
        for ex in examples:
            lines.append(f"| {_cell(ex['prompt'])} | {_cell(ex['sft'])} | {ex['sft_gold']:.2f} | {_cell(ex['ppo'])} | "
                         f"{ex['ppo_gold']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _win(result: Dict) -> str:
    return f"{_pct(result['win_rate'])} [{_pct(result['win_rate_ci_low'])}, {_pct(result['win_rate_ci_high'])}]"


def _gold_reward_section(summary: Dict) -> List[str]:
    """The comparison of PPO against the gold reward (``--reward gold``)
    with PPO against the reward model; [] when the gold run did not run."""
    gold = summary.get("gold_reward")
    if not gold:
        return []
    model = gold.get("model_run", {})

    def change(ends, name):
        return f"{ends[name + '_start']:.3f} -> {ends[name + '_end']:.3f}" if name + "_start" in ends else "n/a"

    return [
        "## PPO against the gold reward",
        "",
        "`--reward gold`: a second PPO run from the SFT model with the same settings, rewarded by the gold judge "
        "itself (a verifiable reward, as a reward function) instead of the learnt reward model; its critic starts "
        "from the policy. Both are evaluated alike on the held-out prompts, so the gap between them is the price "
        "(or the gain) of training against the learnt reward instead of the true one.",
        "",
        "| | PPO, reward model | PPO, gold reward |",
        "| --- | --- | --- |",
        f"| win rate over SFT (held-out, 95% interval) | {_win(summary)} | {_win(gold)} |",
        f"| mean gold score (held-out; SFT {summary['sft_gold']:.3f}) | {summary['ppo_gold']:.3f} | "
        f"{gold['ppo_gold']:.3f} |",
        f"| mean KL to the SFT reference (held-out, nats per response) | {summary['mean_kl']:.3f} | "
        f"{gold['mean_kl']:.3f} |",
        f"| gold score on the evaluation prompts, first -> last probe | {change(model, 'gold')} | "
        f"{change(gold, 'gold')} |",
        f"| reward-model score on the evaluation prompts, first -> last probe | {change(model, 'reward')} | "
        f"{change(gold, 'reward')} |",
        "",
        f"![Reward model against gold reward]({GOLD_PLOT})",
        "",
    ]


def write_report(folder, summary: Dict, examples: Sequence[Dict] = (),
                 artifacts: Optional[Callable[[List[Path]], None]] = None) -> Path:
    """Draw the plots from ``folder/metrics.jsonl`` and write ``report.md``
    and ``summary.json`` into ``folder``; returns the report's path.
    ``artifacts`` (e.g. ``Run.log_artifacts``, for the ``--report_to``
    trackers) is handed the files written (:func:`report_files`).

    ``summary`` needs ``rm_accuracy``, ``win_rate``, ``win_rate_ci_low``,
    ``win_rate_ci_high``, ``wins``, ``ties``, ``losses``, ``win_n``,
    ``sft_gold``, ``ppo_gold``, ``mean_kl``, ``kl_bound``, ``wall_seconds``
    and optionally ``nokl`` (``reward_start``, ``reward_end``, ``gold_start``,
    ``gold_end``, ``kl_end``) and ``gold_reward`` (the PPO run against the
    gold reward: ``win_rate``, ``win_rate_ci_low``, ``win_rate_ci_high``,
    ``ppo_gold``, ``mean_kl``, its probes' ``gold_start``/``gold_end``/
    ``reward_start``/``reward_end`` and the reward-model run's as ``model_run``).
    """
    folder = Path(folder)
    rows = read_metrics(folder)
    plot_sft(rows, folder / PLOTS["sft"])
    plot_rm(rows, folder / PLOTS["rm"])
    plot_ppo(rows, folder / PLOTS["ppo"], summary["kl_bound"])
    plot_overoptimization(rows, folder / PLOTS["overoptimization"])
    if summary.get("gold_reward"):
        plot_overoptimization(rows, folder / GOLD_PLOT, stages=GOLD_STAGES)
    clean = json.loads(json.dumps(summary, default=float), parse_constant=lambda _: None)
    (folder / SUMMARY_FILE).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    path = folder / REPORT_FILE
    path.write_text(render_markdown(summary, examples) + "\n", encoding="utf-8")
    if artifacts is not None:
        artifacts(report_files(folder))
    return path


def report_files(folder) -> List[Path]:
    """The report's files in ``folder`` that exist: its plots, ``report.md`` and ``summary.json``."""
    folder = Path(folder)
    names = (*PLOTS.values(), GOLD_PLOT, REPORT_FILE, SUMMARY_FILE)
    return [folder / name for name in names if (folder / name).is_file()]
