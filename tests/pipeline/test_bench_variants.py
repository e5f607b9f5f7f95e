"""``rlhf-engine bench ppo``'s variants: ``--lora_r`` and ``--dtype`` reach
the engine (and are refused, status 2 before any model is built, when bad),
the report carries every phase and the load average; and the TRL comparison's
variant flags (benchmarks/engine/compare_trl.py) map each variant to the same
setting on both sides."""
import pytest

from benchmarks.engine.compare_trl import VARIANTS, variant_flags
from rlhf_engine import bench, cli


def test_the_flags_reach_run_ppo_bench(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "run_ppo_bench", lambda size, **kwargs: calls.append((size, kwargs)) or {})
    assert cli.main(["bench", "ppo", "--size", "medium", "--iterations", "2", "--lora_r", "8",
                     "--dtype", "bfloat16"]) == 0
    assert calls == [("medium", dict(iterations=2, warmup=1, dtype="bfloat16", lora_r=8))]
    assert cli.main(["bench", "ppo"]) == 0  # defaults: full fine-tuning in float32
    assert calls[-1] == ("tiny", dict(iterations=3, warmup=1, dtype="float32", lora_r=0))
    capsys.readouterr()


@pytest.mark.parametrize("extra, named", [(["--lora_r", "-1"], "lora_r must be an int >= 0"),
                                          (["--dtype", "float16"], "--dtype")])
def test_a_bad_variant_is_refused_before_any_work(monkeypatch, capsys, extra, named):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_ppo_bench", refuse)
    try:
        status = cli.main(["bench", "ppo", *extra])
    except SystemExit as exc:  # argparse's refusal of a choice
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and named in err and "Traceback" not in err, err


def test_a_lora_bf16_run_reports_its_variant_and_every_phase():
    report = bench.run_ppo_bench("tiny", iterations=1, warmup=0, lora_r=4, dtype="bfloat16", max_new_tokens=4)
    assert (report["config"]["lora_r"], report["config"]["dtype"]) == (4, "bfloat16")
    assert set(report["phases"]) == {"rollout", "score", "advantages", "learn"}
    assert report["iteration_seconds"] == [report["seconds_per_iteration"]]
    assert 0 < sum(report["phases"].values()) <= report["seconds_per_iteration"]
    assert set(report["loadavg_1min"]) == {"start", "end"} and report["peak_rss_mib"] > 0


def test_each_variant_sets_the_same_thing_on_both_sides():
    flags = {variant: variant_flags(variant, 16) for variant in VARIANTS}
    assert flags["full"] == ([], [])
    assert flags["lora"] == (["--lora_r", "16"], ["--lora_r", "16"])
    assert flags["full_bf16"] == (["--dtype", "bfloat16"], ["--bf16"])
    assert flags["lora_bf16"] == (["--lora_r", "16", "--dtype", "bfloat16"], ["--lora_r", "16", "--bf16"])
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_flags("qlora", 16)
