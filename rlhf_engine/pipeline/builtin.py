"""The built-in pipeline: the synthetic task of :mod:`rlhf_engine.pipeline.task`
run end to end on a laptop CPU, the InstructGPT recipe in miniature.

1. **data**: demonstrations by the gold solver (a fraction imperfect),
   rankings by a simulated annotator, PPO prompts, held-out prompts and
   held-out comparisons labelled by the gold judge, as JSONL in ``data/``;
2. a byte-level tokenizer of the task's template words (the task's letters
   and digits stay one token each) and a small Llama built locally;
3. **SFT** on the demonstrations;
4. **reward model** from the SFT model, on the rankings, its scores shifted
   so that the demonstrations the SFT stage held out score 0 on average;
5. **PPO** against the reward model with a per-token KL penalty to the SFT
   model, the critic initialised from the reward model (with
   ``--ppo_ptx_coef > 0``, PPO-ptx on the SFT stage's training
   demonstrations);
6. a second, short **PPO without the KL penalty** (kl_coef 0; PPO-ptx as
   in 5.) from the SFT model, to show over-optimisation;
7. **evaluation**: the gold judge's win rate of PPO over SFT on the held-out
   prompts (one sample each, at the PPO sampling temperature), and the KL of
   the PPO policy to the SFT model there;
8. the **report** (:mod:`rlhf_engine.pipeline.report`).

Every stage keeps its outputs in the run folder (see
:mod:`rlhf_engine.pipeline.run`), so ``--resume`` skips what is done.

Every stage runs on ``--ppo_device``; under torch.distributed (``torchrun``)
the training stages are data-parallel (rank 0 writes the data, the records
and the report), with results that do not depend on the world size.
"""
import contextlib
import dataclasses
import functools
import json
import time
from typing import Dict, List

import torch

from rlhf_engine import distributed
from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.models.builders import SIZES, build_policy
from rlhf_engine.models.lora import LoraOptions
from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm
from rlhf_engine.models.tokenizer import MIN_VOCAB_SIZE, byte_tokenizer
from rlhf_engine.options import check_int, option
from rlhf_engine.pipeline import batching, report, task
from rlhf_engine.pipeline.config import prefixed, unprefixed
from rlhf_engine.pipeline.data import (PLAIN_SEPARATOR, Comparison, LengthPolicyError, encode_prompt, read_jsonl,
                                       write_jsonl)
from rlhf_engine.pipeline.evaluate import generate_responses, judge_gold, judge_reward_model, win_rate
from rlhf_engine.pipeline.ppo_stage import PolicyProbe, PPOStageConfig, check_ptx_options, encode_ptx, train_ppo
from rlhf_engine.pipeline.reward import RMConfig, train_reward_model
from rlhf_engine.pipeline.run import Run, load_causal_lm, load_reward_model, process_seconds, train_stage
from rlhf_engine.pipeline.sft import SFTConfig, train_sft

DATA_FILES = {"demonstrations": "demonstrations.jsonl", "rankings": "rankings.jsonl", "prompts": "prompts.jsonl",
              "heldout_prompts": "heldout_prompts.jsonl", "probe_prompts": "probe_prompts.jsonl",
              "rm_eval": "rm_eval_comparisons.jsonl"}


REWARDS = ("model", "gold")


@dataclasses.dataclass
class TaskConfig(LoraOptions):
    """The built-in task's data, model and evaluation. Its LoRA options
    (``--lora_r`` ...) apply to the stages that fine-tune a trained model,
    the reward model and both PPO runs (:func:`pipeline_lora`)."""

    data_seed: int = option(0, "Seed of the generated data (each file draws from its own seed derived from it).")
    demonstrations: int = option(20000, "Demonstrations for SFT.")
    demo_noise: float = option(0.5, "Fraction of the demonstrations that are imperfect (the gold answer after "
                                    "1 or 2 random edits): SFT learns their slips, PPO against the reward model "
                                    "removes them.")
    rankings: int = option(4000, "Rankings for the reward model.")
    ranking_size: int = option(4, "Responses per ranking (K: K(K-1)/2 pairs each).")
    annotator_beta: float = option(30.0, "How consistently the simulated annotators follow the gold score "
                                         "(Plackett-Luce/Bradley-Terry inverse temperature; 0: at random).")
    prompts: int = option(8192, "PPO training prompts.")
    heldout_prompts: int = option(1000, "Held-out prompts of the final PPO-versus-SFT evaluation.")
    probe_prompts: int = option(128, "Prompts on which the PPO runs are probed (gold score, reward-model score, "
                                     "KL) every ppo_eval_every iterations.")
    rm_eval_comparisons: int = option(500, "Held-out comparisons labelled by the gold judge, for the reward "
                                            "model's accuracy.")
    policy_size: str = option("tiny", f"Size of the Llama policy built locally: one of {sorted(SIZES)}.")
    policy_layers: int = option(4, "Layers of the policy (overrides the size's; 0: the size's own).")
    policy_intermediate_size: int = option(512, "MLP width of the policy (overrides the size's; 0: the size's own).")
    vocab_size: int = option(300, "Most tokens of the byte-level tokenizer (special tokens + 256 bytes + merges "
                                  "of the task's template words).")
    model_seed: int = option(0, "Seed of the policy's and the reward head's initialisation.")
    nokl_iterations: int = option(40, "Iterations of the PPO run without KL penalty (0: skip it).")
    nokl_lr: float = option(1e-4, "Policy learning rate of the PPO run without KL penalty.")
    kl_bound: float = option(2.0, "The most mean KL (nats per response) of the PPO policy to the SFT model on the "
                                  "held-out prompts that the report accepts.")
    eval_batch_size: int = option(128, "Prompts sampled at once in evaluation.")
    reward: str = option("model", "What PPO trains against: 'model' (the learnt reward model), or 'gold' (also a "
                                  "PPO run 'ppo_gold' against the gold judge as a reward function, evaluated like "
                                  "the reward-model run and compared with it in the report).")

    def __post_init__(self):
        self.check_lora()
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.policy_size not in SIZES:
            raise ValueError(f"policy_size must be one of {sorted(SIZES)}, got {self.policy_size!r}")
        for name in ("demonstrations", "rankings", "prompts", "heldout_prompts", "probe_prompts",
                     "rm_eval_comparisons", "eval_batch_size"):
            check_int(self, name, 1)
        for name in ("data_seed", "model_seed", "nokl_iterations", "policy_layers", "policy_intermediate_size"):
            check_int(self, name, 0)
        check_int(self, "ranking_size", 2)
        check_int(self, "vocab_size", MIN_VOCAB_SIZE)
        if isinstance(self.demo_noise, bool) or not isinstance(self.demo_noise, (int, float)) or \
                not 0 <= self.demo_noise <= 1:
            raise ValueError(f"demo_noise must be a number in [0, 1], got {self.demo_noise!r}")
        for name in ("annotator_beta", "nokl_lr", "kl_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# The stages' defaults for the built-in task (the flags' defaults in `rlhf-engine pipeline --help`).
SFT_DEFAULTS = dict(max_steps=800, batch_size=32, lr=1e-3, eval_every=200, eval_fraction=0.02, save_every=200)
RM_DEFAULTS = dict(max_steps=300, batch_size=32, lr=3e-4, eval_every=100, save_every=100)
PPO_STAGE_DEFAULTS = dict(prompts_per_iteration=64, iterations=100, save_every=25, eval_every=10)
ENGINE_DEFAULTS = dict(device="cpu", max_new_tokens=10, temperature=1.0, kl_coef=0.2, lr=1e-4, critic_lr=5e-5,
                       ppo_epochs=2, mini_batch_size=32, seed=0)

SFTOptions = prefixed(SFTConfig, "sft_", "SFTOptions", **SFT_DEFAULTS)
RMOptions = prefixed(RMConfig, "rm_", "RMOptions", **RM_DEFAULTS)
PPOOptions = prefixed(PPOStageConfig, "ppo_", "PPOOptions", **PPO_STAGE_DEFAULTS)
EngineOptions = prefixed(EngineConfig, "ppo_", "EngineOptions", **ENGINE_DEFAULTS)
OPTION_TYPES = (TaskConfig, SFTOptions, RMOptions, PPOOptions, EngineOptions)

# `--quick`: a smoke test of every stage in seconds (tiny data, a few steps); its results mean nothing.
QUICK = dict(demonstrations=64, rankings=32, ranking_size=3, prompts=32, heldout_prompts=16, probe_prompts=8,
             rm_eval_comparisons=16, nokl_iterations=2, eval_batch_size=16,
             sft_max_steps=4, sft_batch_size=8, sft_eval_every=2, sft_save_every=0,
             rm_max_steps=3, rm_batch_size=8, rm_eval_every=0, rm_save_every=0,
             ppo_prompts_per_iteration=8, ppo_iterations=3, ppo_save_every=0, ppo_eval_every=2,
             ppo_max_new_tokens=6, ppo_mini_batch_size=8)


@dataclasses.dataclass
class StageConfigs:
    """The built-in pipeline's options, split per stage."""

    task: TaskConfig
    sft: SFTConfig
    rm: RMConfig
    ppo: PPOStageConfig
    engine: EngineConfig



def stage_configs(task_config: TaskConfig, sft, rm, ppo, engine) -> StageConfigs:
    """The stages' configs from the parsed options (:data:`OPTION_TYPES`
    instances); raises ValueError naming a bad option (or PPO-ptx options
    with ``ppo_ptx_coef`` 0: its data, the demonstrations, is always there)."""
    configs = StageConfigs(task_config, unprefixed(sft, SFTConfig, "sft_"), unprefixed(rm, RMConfig, "rm_"),
                           unprefixed(ppo, PPOStageConfig, "ppo_"), unprefixed(engine, EngineConfig, "ppo_"))
    configs = pipeline_lora(configs)
    check_ptx_options(configs.engine.ptx_coef, configs.engine.ptx_coef > 0, configs.ppo, prefix="ppo_")
    if configs.rm.normalize_rewards and not configs.sft.eval_fraction:
        raise ValueError("--rm_normalize_rewards (on by default) scores the SFT stage's held-out demonstrations: "
                         "set --sft_eval_fraction > 0, or --rm_normalize_rewards false")
    if configs.rm.normalize_rewards and task_config.demonstrations < 2:
        raise ValueError(f"demonstrations={task_config.demonstrations}: --rm_normalize_rewards (on by default) "
                         f"scores demonstrations the SFT stage holds out, and it trains on at least one: set "
                         f"--demonstrations >= 2, or --rm_normalize_rewards false")
    if task_config.nokl_iterations:  # the engine config of the run without KL penalty, refused here rather than later
        try:
            nokl_engine(configs)
        except ValueError as exc:
            raise ValueError(f"the PPO run without KL penalty (--nokl_iterations {task_config.nokl_iterations}, "
                             f"--nokl_lr {task_config.nokl_lr}): {exc}") from None
    return configs


# With LoRA, the learning rates left at the built-in defaults are this many times higher: adapters (a small
# low-rank update from zero) need about ten times full fine-tuning's rate for the same progress.
LORA_LR_FACTOR = 10.0


def pipeline_lora(configs: StageConfigs) -> StageConfigs:
    """The pipeline-level LoRA options (``--lora_r`` ...) applied to the
    reward model and the PPO runs (not to SFT, which trains the built
    policy from its random initialisation, where low-rank adapters cannot
    learn the task: ``--sft_lora_r`` asks for it). A stage given its own
    ``--<stage>_lora_r`` keeps its own LoRA options. In every stage the
    pipeline-level options turn on, the learning rates left at the built-in
    defaults (``--rm_lr``, ``--ppo_lr``, ``--ppo_critic_lr``, ``--nokl_lr``)
    are multiplied by :data:`LORA_LR_FACTOR`."""
    task_config = configs.task
    if not task_config.lora:
        return configs
    options = dataclasses.asdict(task_config.lora_options())

    def adapted(config, defaults, lr_names):
        if config.lora:
            return config
        rates = {name: getattr(config, name) * LORA_LR_FACTOR for name in lr_names
                 if getattr(config, name) == defaults[name]}
        return dataclasses.replace(config, **options, **rates)

    if not configs.engine.lora and task_config.nokl_lr == TaskConfig.__dataclass_fields__["nokl_lr"].default:
        task_config = dataclasses.replace(task_config, nokl_lr=task_config.nokl_lr * LORA_LR_FACTOR)
    return dataclasses.replace(configs, task=task_config, rm=adapted(configs.rm, RM_DEFAULTS, ("lr",)),
                               engine=adapted(configs.engine, ENGINE_DEFAULTS, ("lr", "critic_lr")))


def nokl_engine(configs: StageConfigs) -> EngineConfig:
    """The engine config of the PPO run without KL penalty: the PPO run's, with kl_coef 0 and ``nokl_lr``."""
    return dataclasses.replace(configs.engine, kl_coef=0.0, kl_target=None, lr=configs.task.nokl_lr)


@contextlib.contextmanager
def _stage_options(prefix: str):
    """A length policy that drops every example of a stage named with the
    stage's own flags (``--sft_max_length``, ...)."""
    try:
        yield
    except LengthPolicyError as exc:
        raise exc.with_prefix(prefix) from None


# -- data and models ------------------------------------------------------------------

def task_tokenizer(vocab_size: int):
    """The byte-level tokenizer of the task: merges learnt only from the
    template words (family names, the answer separator), so that every
    letter and digit of a task word stays one token."""
    return byte_tokenizer([f"{family}: {PLAIN_SEPARATOR}" for family in task.FAMILIES], vocab_size)


def gold_labelled(comparisons: List[Comparison]) -> List[Comparison]:
    """``comparisons`` with ``chosen`` the response the gold judge scores
    higher (the task's comparisons never tie)."""
    return [c if task.gold_score(c.prompt, c.chosen) > task.gold_score(c.prompt, c.rejected)
            else Comparison(c.prompt, c.rejected, c.chosen) for c in comparisons]


def write_task_data(run: Run, cfg: TaskConfig) -> Dict[str, list]:
    """Generate the task's data files into ``data/`` (once, on rank 0: a
    resumed run reads them back) and return their records by name (every
    rank reads the files)."""
    folder = run.stage_dir("data")
    paths = {name: folder / file for name, file in DATA_FILES.items()}
    kinds = {"demonstrations": "demonstrations", "rankings": "rankings", "rm_eval": "comparisons"}
    if run.skip_if_done("data") is None:
        run.finish("data", _write_task_files(paths, cfg) if run.is_main else None)
    return {name: read_jsonl(path, kinds.get(name, "prompts")) for name, path in paths.items()}


def _write_task_files(paths, cfg: TaskConfig) -> Dict[str, int]:
    """Generate the task's data into ``paths`` (by name); the record counts."""
    seed = cfg.data_seed * 100  # each file its own seed, so that no two sets share prompts by construction
    records = {
        "demonstrations": task.make_demonstrations(cfg.demonstrations, seed + 1, noise=cfg.demo_noise),
        "rankings": task.make_rankings(cfg.rankings, cfg.ranking_size, seed + 2, beta=cfg.annotator_beta),
        "prompts": task.make_prompts(cfg.prompts, seed + 3),
        "heldout_prompts": task.make_prompts(cfg.heldout_prompts, seed + 4),
        "probe_prompts": task.make_prompts(cfg.probe_prompts, seed + 5),
        "rm_eval": gold_labelled(task.make_comparisons(cfg.rm_eval_comparisons, seed + 6, beta=cfg.annotator_beta)),
    }
    for name, items in records.items():
        write_jsonl(paths[name], items)
    return {name: len(items) for name, items in records.items()}


def _load_lm(path):
    return load_causal_lm(str(path))[0]


# -- the pipeline -------------------------------------------------------------------------

def run_pipeline(run: Run, configs: StageConfigs) -> Dict:
    """Run every stage of the built-in pipeline in ``run`` (skipping the
    finished ones), write the report, and return the summary."""
    began = time.perf_counter()
    cfg = configs.task
    data = write_task_data(run, cfg)
    tokenizer = task_tokenizer(cfg.vocab_size)
    overrides = {name: value for name, value in (("num_hidden_layers", cfg.policy_layers),
                                                 ("intermediate_size", cfg.policy_intermediate_size)) if value}
    policy = build_policy(cfg.policy_size, tokenizer, seed=cfg.model_seed, **overrides)
    run.log(f"policy: Llama '{cfg.policy_size}' {overrides}, {sum(p.numel() for p in policy.parameters()):,} "
            f"parameters, vocabulary {len(tokenizer)}")
    with _stage_options("sft_"):
        train_stage(run, "sft", policy, tokenizer, train_sft, data["demonstrations"], None, configs.sft)
    sft_model = _load_lm(run.model_dir("sft"))

    reward_model = reward_model_from_causal_lm(sft_model, seed=cfg.model_seed)
    # rewards normalised on the demonstrations the SFT stage held out (train_sft's own split)
    held_out = batching.split_eval(data["demonstrations"], configs.sft.eval_fraction, configs.sft.seed)[1]
    train_rm = functools.partial(train_reward_model, demonstrations=held_out)
    with _stage_options("rm_"):
        rm_result = train_stage(run, "rm", reward_model, tokenizer, train_rm, data["rankings"], data["rm_eval"],
                                configs.rm, postfix=lambda m: {"loss": m["loss"], "acc": m["accuracy"]})
    reward_model = load_reward_model(str(run.model_dir("rm")))

    judge_rm = functools.partial(judge_reward_model, reward_model, tokenizer, batch_size=cfg.eval_batch_size)
    engine_cfg = configs.engine
    probe = PolicyProbe(tokenizer, [p.prompt for p in data["probe_prompts"]], {"gold": judge_gold, "reward": judge_rm},
                        sft_model, max_new_tokens=engine_cfg.max_new_tokens, temperature=engine_cfg.temperature,
                        seed=cfg.data_seed, batch_size=cfg.eval_batch_size)
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in data["prompts"]]
    ptx_rows = None
    if engine_cfg.ptx_coef > 0:  # PPO-ptx on the SFT stage's training demonstrations, encoded as it encodes them
        sft_train = batching.split_eval(data["demonstrations"], configs.sft.eval_fraction, configs.sft.seed)[0]
        with _stage_options("sft_"):
            ptx_rows, length_report = encode_ptx(tokenizer, sft_train, configs.sft.max_length,
                                                 configs.sft.length_policy)
        run.log(f"PPO-ptx: the SFT stage's {len(ptx_rows)} training demonstrations ({length_report})")
    ppo_result = _ppo(run, "ppo", sft_model, reward_model, tokenizer, engine_cfg, configs.ppo, prompt_ids, probe,
                      ptx_rows)
    if cfg.nokl_iterations:
        _ppo(run, "ppo_nokl", sft_model, reward_model, tokenizer, nokl_engine(configs),
             dataclasses.replace(configs.ppo, iterations=cfg.nokl_iterations), prompt_ids, probe, ptx_rows)

    if cfg.reward == "gold":  # PPO against the verifiable reward, to compare with the reward-model run
        gold_result = _ppo(run, "ppo_gold", sft_model, None, tokenizer, gold_engine(configs), configs.ppo, prompt_ids,
                           probe, ptx_rows, reward_funcs={"gold": task.gold_reward}, heldout_reward="gold")

    heldout = [p.prompt for p in data["heldout_prompts"]]
    evaluation = evaluate_builtin(run, cfg, engine_cfg, tokenizer, _placed(sft_model, run.device),
                                  _load_lm(run.model_dir("ppo")).to(run.device), heldout)
    gold_summary = {}
    if cfg.reward == "gold":
        gold_eval = evaluate_builtin(run, cfg, engine_cfg, tokenizer, _placed(sft_model, run.device),
                                     _load_lm(run.model_dir("ppo_gold")).to(run.device), heldout, stage="eval_gold")
        gold_summary = {**{key: gold_eval[key] for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "win_n",
                                                            "ppo_gold", "mean_kl")},
                        "train_kl_mean": gold_result["kl_mean"], **_probe_ends(run, "ppo_gold"),
                        "model_run": _probe_ends(run, "ppo")}
    summary = {
        "rm_accuracy": rm_result["eval_accuracy"],
        **{key: evaluation[key] for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "wins", "ties",
                                            "losses", "win_n", "sft_gold", "ppo_gold", "mean_kl")},
        "kl_bound": cfg.kl_bound,
        "ppo_train_kl_mean": ppo_result["kl_mean"],
        "nokl": _nokl_summary(run) if cfg.nokl_iterations else {},
        "gold_reward": gold_summary,
        "wall_seconds": process_seconds(began),
        "resumed": run.resume,
        "torch_threads": torch.get_num_threads(),
    }
    if run.is_main:
        written = report.write_report(run.folder, summary, evaluation['examples'], artifacts=run.log_artifacts)
        run.log(f"report: {written}")
    return summary


def _placed(model, device):
    """``model`` on ``device`` (a model an engine has sharded is already placed)."""
    return model if distributed.is_sharded(model) else model.to(device)


def gold_engine(configs: StageConfigs) -> EngineConfig:
    """The engine config of the PPO run against the gold reward: the PPO
    run's, its critic (if any) started from the policy (there is no reward
    model to start it from, and the gold score is on another scale)."""
    engine = configs.engine
    return dataclasses.replace(engine, critic_init="policy") if engine.uses_critic else engine


def _ppo(run, stage, sft_model, reward_model, tokenizer, engine_cfg, stage_cfg, prompt_ids, probe, ptx_rows=None,
         reward_funcs=None, **train_options):
    """One PPO stage from the SFT model (policy = a trainable copy, reference
    = the SFT model itself, critic from the reward model unless
    ``engine_cfg`` says otherwise) against ``reward_model`` (or None) and
    ``reward_funcs``; ``ptx_rows``: the PPO-ptx rows when
    ``engine_cfg.ptx_coef > 0``; ``train_options``: :func:`train_ppo`'s
    (e.g. ``heldout_reward``)."""
    done = run.skip_if_done(stage)
    if done is not None:
        return done
    policy = _load_lm(run.model_dir("sft"))
    if engine_cfg.lora:  # the reference is the policy without its adapters; the critic's adapters go on a fresh
        # copy of the reward model (the engine wraps it in place: the probe's judge keeps the one given)
        reward_model = None if reward_model is None else load_reward_model(str(run.model_dir("rm")))
    engine = RLHFEngine(policy, tokenizer, engine_cfg, reward_model=reward_model, reward_funcs=reward_funcs,
                        ref_model=None if engine_cfg.lora else sft_model)
    return train_ppo(run, stage, engine, prompt_ids, stage_cfg, probe=probe, ptx_rows=ptx_rows, **train_options)


def evaluate_builtin(run: Run, cfg: TaskConfig, engine_cfg: EngineConfig, tokenizer, sft_model, ppo_model,
                     prompts: List[str], stage: str = "eval") -> Dict:
    """The gold judge's win rate of PPO over SFT on ``prompts`` and the PPO
    policy's KL to the SFT model there; written to ``<stage>/`` (result and
    every response)."""
    done = run.skip_if_done(stage)
    if done is not None:
        return done
    sampling = dict(max_new_tokens=engine_cfg.max_new_tokens, temperature=engine_cfg.temperature,
                    seed=cfg.data_seed + 1, batch_size=cfg.eval_batch_size)
    # one sample per prompt from each policy, drawn alike (same sampler, seed and batches)
    ppo_responses, kls = PolicyProbe(tokenizer, prompts, {}, sft_model, **sampling).sample(ppo_model)
    sft_responses = generate_responses(sft_model, tokenizer, prompts, **sampling)
    ppo_gold, sft_gold = judge_gold(prompts, ppo_responses), judge_gold(prompts, sft_responses)
    rate = win_rate(ppo_gold, sft_gold)
    rows = [dict(prompt=p, sft=s, sft_gold=sg, ppo=q, ppo_gold=qg, ppo_kl=kl)
            for p, s, sg, q, qg, kl in zip(prompts, sft_responses, sft_gold, ppo_responses, ppo_gold, kls)]
    if run.is_main:
        with open(run.stage_dir(stage) / "responses.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    examples = [{key: value for key, value in row.items() if key != "ppo_kl"} for row in rows[:8]]
    result = {"win_rate": rate.rate, "win_rate_ci_low": rate.low, "win_rate_ci_high": rate.high, "wins": rate.wins,
              "ties": rate.ties, "losses": rate.losses, "win_n": rate.n,
              "sft_gold": sum(sft_gold) / rate.n, "ppo_gold": sum(ppo_gold) / rate.n,
              "mean_kl": sum(kls) / len(kls), "examples": examples}
    run.log(f"{stage}: PPO over SFT win rate {rate.rate:.3f} [{rate.low:.3f}, {rate.high:.3f}] on {rate.n} "
            f"held-out prompts; mean KL {result['mean_kl']:.3f}")
    return run.finish(stage, result)


def _probe_ends(run: Run, stage: str) -> Dict[str, float]:
    """The first and last probe's gold and reward-model scores of a PPO stage (the evaluation prompts)."""
    rows = report.read_metrics(run.folder)
    ends = {}
    for key, name in (("probe/gold", "gold"), ("probe/reward", "reward")):
        values = report.series(rows, stage, key)[1]
        if values:
            ends.update({f"{name}_start": values[0], f"{name}_end": values[-1]})
    return ends


def _nokl_summary(run: Run) -> Dict[str, float]:
    rows = report.read_metrics(run.folder)
    _, reward = report.series(rows, "ppo_nokl", "probe/reward")
    _, gold = report.series(rows, "ppo_nokl", "probe/gold")
    _, kl = report.series(rows, "ppo_nokl", "probe/kl")
    if not reward:
        return {}
    return {"reward_start": reward[0], "reward_end": reward[-1], "gold_start": gold[0], "gold_end": gold[-1],
            "kl_end": kl[-1]}
