"""Offload: the per-phase plan, policy parsing, the placement bookkeeping (on
CPU, with the "meta" device standing in for the offload target), and on a
GPU real placement, bit-identical round trips and identical optimizer steps."""
import pytest
import torch
from torch import nn

from rlhf_engine.engine import offload
from rlhf_engine.engine.offload import ITEMS, PHASES, Move, OffloadPolicy, Placement, plan

# DESIGN.md, "The engine": what each phase keeps on the device.
TABLE = {
    "rollout": {"policy"},
    "score": {"policy", "ref", "reward", "critic"},
    "learn": {"policy", "critic", "policy_optim", "critic_optim"},
}


def on_device(policy, phase):
    return {item for item, on in plan(policy, phase).items() if on}


def test_default_plan_is_the_design_table():
    for phase in PHASES:
        assert on_device(OffloadPolicy(enabled=True), phase) == TABLE[phase]
        assert on_device(OffloadPolicy(), phase) == set(ITEMS)  # disabled: everything stays
    with pytest.raises(ValueError, match="phase"):
        plan(OffloadPolicy(), "generate")


def test_parse_overrides_defaults():
    policy = OffloadPolicy.parse(" reward=all, ref=score+learn ")
    assert policy.enabled and policy.reward == set(PHASES) and policy.ref == {"score", "learn"}
    assert on_device(policy, "rollout") == {"policy", "reward"}
    assert on_device(policy, "learn") == TABLE["learn"] | {"ref", "reward"}
    assert OffloadPolicy.parse("", enabled=False) == OffloadPolicy()
    assert OffloadPolicy.parse("critic=all,policy_optim=learn") == OffloadPolicy(
        enabled=True, critic=PHASES, policy_optim={"learn"})
    assert OffloadPolicy(reward="rollout+score") == OffloadPolicy(reward=("score", "rollout"))
    assert str(policy) == "ref=score+learn,reward=all"
    assert str(OffloadPolicy()) == ""
    assert OffloadPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("spec, message", [
    ("value=all", "unknown item 'value'"),
    ("reward=all,reward=score", "given twice"),
    ("reward", "expected item=phases"),
    ("ref=score+generate", r"ref: unknown phase\(s\) \['generate'\]"),
    ("critic=learn", "critic: must stay on the compute device in score"),
    ("ref=none", "ref: must stay on the compute device in score"),
    ("policy_optim=rollout", "policy_optim: must stay .* in learn"),
])
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        OffloadPolicy.parse(spec)


def fake_copy(t, target, pin):
    """Optimizer state moves between "cpu" and "meta", without data."""
    return torch.empty_like(t, device=target)


def fake_move_module(module, target, pin):
    """``_move_module`` between "cpu" and "meta" (whose tensors cannot take
    ``.data`` swaps): ``to_empty``, reporting what moved the same way."""
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    moving = [t for t in tensors if t.device != target]
    module.to_empty(device=target)
    return (str(moving[0].device) if moving else None), sum(t.nbytes for t in moving)


@pytest.fixture
def meta_offload(monkeypatch):
    monkeypatch.setattr(offload, "_copy", fake_copy)
    monkeypatch.setattr(offload, "_move_module", fake_move_module)


def make_models(device="cpu"):
    torch.manual_seed(0)
    models = {name: nn.Linear(4, 3).to(device) for name in ("policy", "ref", "reward", "critic")}
    models["critic"].register_buffer("scale", torch.ones(5, device=device))
    optimizers = {f"{name}_optim": torch.optim.AdamW(models[name].parameters(), lr=0.1)
                  for name in ("policy", "critic")}
    return models, optimizers


def train_step(models, optimizers, x):
    for name in ("policy", "critic"):
        models[name](x).square().sum().backward()
        optimizers[f"{name}_optim"].step()


def param_bytes(module):
    return sum(p.nbytes for p in module.parameters())


def test_placement_moves_only_what_changes(meta_offload):
    models, optimizers = make_models()
    train_step(models, optimizers, torch.randn(2, 4))  # optimizer state and grads exist
    placement = Placement("cpu", "meta", OffloadPolicy(enabled=True), models, optimizers)
    assert set(placement.where().values()) == {"cpu"}

    moved = placement.enter("rollout")
    expected = {"ref": param_bytes(models["ref"]), "reward": param_bytes(models["reward"]),
                "critic": 2 * param_bytes(models["critic"]) + 5 * 4,  # params, grads, the buffer
                # AdamW: exp_avg and exp_avg_sq, each the size of the parameters.
                "policy_optim": 2 * param_bytes(models["policy"]), "critic_optim": 2 * param_bytes(models["critic"])}
    assert placement.moves == [Move("rollout", item, "cpu", "meta", n) for item, n in expected.items()]
    assert moved == sum(expected.values())
    where = placement.where()
    assert {item for item, device in where.items() if device == "cpu"} == TABLE["rollout"]
    assert models["critic"].weight.grad.device.type == "meta"
    assert models["critic"].get_buffer("scale").device.type == "meta"
    # Adam's 0-dim step counter stays where AdamW put it (the CPU).
    assert all(s["step"].device.type == "cpu" for s in optimizers["critic_optim"].state.values())

    assert placement.enter("rollout") == 0 and placement.moves == []
    placement.enter("score")
    assert [(m.item, m.src, m.dst) for m in placement.moves] == [
        ("ref", "meta", "cpu"), ("reward", "meta", "cpu"), ("critic", "meta", "cpu")]
    placement.enter("learn")
    assert [(m.item, m.dst) for m in placement.moves] == [
        ("ref", "meta"), ("reward", "meta"), ("policy_optim", "cpu"), ("critic_optim", "cpu")]
    assert {item for item, device in placement.where().items() if device == "cpu"} == TABLE["learn"]
    assert placement.phase == "learn"


def test_disabled_policy_never_moves(meta_offload):
    models, optimizers = make_models()
    placement = Placement("cpu", "meta", OffloadPolicy(), models, optimizers)
    for phase in PHASES * 2:
        assert placement.enter(phase) == 0 and placement.moves == []
    assert set(placement.where().values()) == {"cpu"}


def test_real_movers_skip_tensors_in_place():
    models, optimizers = make_models()
    train_step(models, optimizers, torch.randn(2, 4))
    weight = models["critic"].weight
    placement = Placement("cpu", "cpu", OffloadPolicy(enabled=True), models, optimizers)
    for phase in PHASES:
        assert placement.enter(phase) == 0 and placement.moves == []
    assert models["critic"].weight is weight


def test_custom_policy_and_missing_items(meta_offload):
    models, _ = make_models()
    optimizer = torch.optim.AdamW(models["policy"].parameters())  # no state yet
    placement = Placement("cpu", "meta", OffloadPolicy.parse("reward=all"),
                          {"policy": models["policy"], "reward": models["reward"], "critic": None},
                          {"policy_optim": optimizer})
    for phase in PHASES:
        assert placement.enter(phase) == 0
    # Without state, an optimizer is reported where its state will be created.
    assert placement.where() == {"policy": "cpu", "reward": "cpu", "policy_optim": "cpu"}


def test_placement_argument_errors():
    models, optimizers = make_models()
    with pytest.raises(ValueError, match=r"modules: unknown item\(s\) \['value'\]"):
        Placement("cpu", modules={"value": models["critic"]})
    with pytest.raises(ValueError, match="optimizers: unknown"):
        Placement("cpu", optimizers={"policy": optimizers["policy_optim"]})
    with pytest.raises(ValueError, match="policy must be an OffloadPolicy"):
        Placement("cpu", policy="reward=all")
    models["critic"].weight = models["policy"].weight
    with pytest.raises(ValueError, match="critic and policy share"):
        Placement("cpu", modules=models)


# --- on a GPU ----------------------------------------------------------------

def all_tensors(models, optimizers):
    """``{name: tensor}`` of every parameter, grad, buffer and optimizer state tensor."""
    out = {}
    for name, model in models.items():
        for key, t in model.named_parameters():
            out[f"{name}.{key}"] = t
            if t.grad is not None:
                out[f"{name}.{key}.grad"] = t.grad
        out.update({f"{name}.{key}": t for key, t in model.named_buffers()})
    for name, optimizer in optimizers.items():
        for i, state in enumerate(optimizer.state.values()):
            out.update({f"{name}.{i}.{key}": t for key, t in state.items()})
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.cpu().reshape(-1).view(torch.uint8),
                                              b.cpu().reshape(-1).view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_placement_round_trip_is_bit_identical(monkeypatch, fused):
    models, _ = make_models("cuda")
    optimizers = {f"{n}_optim": torch.optim.AdamW(models[n].parameters(), lr=0.1, fused=fused)
                  for n in ("policy", "critic")}
    train_step(models, optimizers, torch.randn(2, 4, device="cuda"))
    before = {k: t.clone() for k, t in all_tensors(models, optimizers).items()}
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    placement = Placement("cuda", policy=OffloadPolicy(enabled=True), modules=models, optimizers=optimizers)
    for phase in PHASES * 2:
        placement.enter(phase)
        on = TABLE[phase]
        for name, t in all_tensors(models, optimizers).items():
            if t.dim() == 0 and "optim" in name:  # step counters stay put
                assert t.device == before[name].device, name
            elif name.split(".")[0] in on:
                assert t.is_cuda, (phase, name)
            else:
                assert t.device.type == "cpu" and t.is_pinned(), (phase, name)
        assert {i for i, d in placement.where().items() if d.startswith("cuda")} == on
    assert len(emptied) == 2  # once per rollout left
    for name, t in all_tensors(models, optimizers).items():
        assert same_bits(t, before[name]), name


@pytest.mark.cuda
def test_gpu_steps_after_offload_match_steps_without():
    results = []
    for enabled in (False, True):
        models, optimizers = make_models("cuda")
        placement = Placement("cuda", policy=OffloadPolicy(enabled=enabled), modules=models, optimizers=optimizers)
        gen = torch.Generator("cuda").manual_seed(0)
        for _ in range(3):
            for phase in PHASES:
                placement.enter(phase)
            for model in models.values():
                model.zero_grad()
            train_step(models, optimizers, torch.randn(2, 4, device="cuda", generator=gen))
        results.append(all_tensors(models, optimizers))
    for name, want in results[0].items():
        assert same_bits(results[1][name], want), name
