"""Placement of the four colocated models and two optimizer states per phase.

Each PPO iteration runs three phases (DESIGN.md, "The engine"); with offload
on, an item stays on the compute device only in the phases listed for it in
its :class:`OffloadPolicy` and waits on the offload device (the CPU) in the
others. The defaults are the phases that use each item:

=============  =======================
item           on the compute device
=============  =======================
policy         rollout, score, learn
ref            score
reward         score
critic         score, learn
policy_optim   learn
critic_optim   learn
=============  =======================

A policy may keep an item resident in more phases (fewer transfers, more
memory), never fewer. Sharded (FSDP2) models use FSDP2's own offload instead.
"""
import dataclasses
import itertools
from typing import NamedTuple

import torch

PHASES = ("rollout", "score", "learn")
MODULES = ("policy", "ref", "reward", "critic")
OPTIMIZERS = ("policy_optim", "critic_optim")
ITEMS = MODULES + OPTIMIZERS
# The phases that use each item, so it must be on the compute device there.
USES = {"policy": PHASES, "ref": ("score",), "reward": ("score",), "critic": ("score", "learn"),
        "policy_optim": ("learn",), "critic_optim": ("learn",)}


def _phase_set(value, item):
    """``value`` ("all", "none", "score+learn" or an iterable of phases) as a frozenset."""
    if isinstance(value, str):
        value = {"all": PHASES, "none": ()}.get(value, value.split("+") if value else ())
    phases = frozenset(value)
    unknown = sorted(phases - set(PHASES))
    if unknown:
        raise ValueError(f"{item}: unknown phase(s) {unknown}; phases are {', '.join(PHASES)} (or 'all', 'none')")
    missing = [p for p in USES[item] if p not in phases]
    if missing:
        raise ValueError(f"{item}: must stay on the compute device in {'+'.join(missing)}, the phase(s) that use it")
    return phases


@dataclasses.dataclass(frozen=True)
class OffloadPolicy:
    """Whether to offload, and for each item the phases it stays on the compute
    device (a frozenset; "all", "none", "score+learn" or any iterable is
    accepted and normalised). ValueError for an unknown phase or a phase that
    uses the item but is missing."""

    enabled: bool = False
    policy: frozenset = frozenset(USES["policy"])
    ref: frozenset = frozenset(USES["ref"])
    reward: frozenset = frozenset(USES["reward"])
    critic: frozenset = frozenset(USES["critic"])
    policy_optim: frozenset = frozenset(USES["policy_optim"])
    critic_optim: frozenset = frozenset(USES["critic_optim"])

    def __post_init__(self):
        for item in ITEMS:
            object.__setattr__(self, item, _phase_set(getattr(self, item), item))

    @classmethod
    def parse(cls, spec, enabled=True):
        """The policy ``spec`` describes: comma-separated ``item=phases``
        overrides of the defaults, phases as "all", "none" or joined by "+"
        (e.g. ``"reward=all,ref=score+learn"``; "" keeps every default).
        ValueError naming the bad item, phase or entry."""
        overrides = {}
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            item, sep, phases = (s.strip() for s in entry.partition("="))
            if not sep:
                raise ValueError(f"offload policy entry {entry!r}: expected item=phases")
            if item not in ITEMS:
                raise ValueError(f"offload policy entry {entry!r}: unknown item {item!r}; items are {', '.join(ITEMS)}")
            if item in overrides:
                raise ValueError(f"offload policy: {item!r} given twice")
            overrides[item] = phases
        return cls(enabled=enabled, **overrides)

    def __str__(self):
        """The :meth:`parse` spec of this policy's non-default items ("" for the defaults)."""
        entries = []
        for item in ITEMS:
            phases = getattr(self, item)
            if phases != frozenset(USES[item]):
                text = "all" if len(phases) == len(PHASES) else "+".join(p for p in PHASES if p in phases)
                entries.append(f"{item}={text}")
        return ",".join(entries)


def plan(policy, phase):
    """``{item: True if it is on the compute device in phase}`` for every item
    (all True when the policy is disabled)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return {item: not policy.enabled or phase in getattr(policy, item) for item in ITEMS}


class Move(NamedTuple):
    """One item moved by :meth:`Placement.enter`."""

    phase: str
    item: str
    src: str
    dst: str
    bytes: int


class Placement:
    """Moves the models and optimizer states where :func:`plan` puts them.

    Args:
        device: the compute device.
        offload_device: where offloaded items wait (pinned host memory when
            this is the CPU and ``device`` is CUDA).
        policy: :class:`OffloadPolicy`.
        modules: ``{"policy" | "ref" | "reward" | "critic": nn.Module}``; absent
            or None items are skipped. Modules must not share parameters.
        optimizers: ``{"policy_optim" | "critic_optim": Optimizer}``.
    """

    def __init__(self, device, offload_device="cpu", policy=OffloadPolicy(), modules=None, optimizers=None):
        if not isinstance(policy, OffloadPolicy):
            raise ValueError(f"policy must be an OffloadPolicy (OffloadPolicy.parse reads strings), got {policy!r}")
        self.device = _canonical(device)
        self.offload_device = _canonical(offload_device)
        self.policy = policy
        self.modules = {k: m for k, m in (modules or {}).items() if m is not None}
        self.optimizers = {k: o for k, o in (optimizers or {}).items() if o is not None}
        for name, given, allowed in (("modules", self.modules, MODULES), ("optimizers", self.optimizers, OPTIMIZERS)):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"{name}: unknown item(s) {unknown}; expected some of {', '.join(allowed)}")
        owner = {}
        for name, module in self.modules.items():
            for t in itertools.chain(module.parameters(), module.buffers()):
                if owner.setdefault(id(t), name) != name:
                    raise ValueError(f"modules: {name} and {owner[id(t)]} share a parameter or buffer, "
                                     f"so they cannot be placed separately")
        self.phase = None
        self.moves = []

    def enter(self, phase):
        """Move every item where ``plan(policy, phase)`` puts it; return the
        bytes moved. Tensors already in place are not touched; the moves
        made are in :attr:`moves` (replaced on each call). On return all
        copies are complete. Leaving rollout on CUDA with offload on returns
        the allocator's cached blocks (the freed KV cache) to the device."""
        on_device = plan(self.policy, phase)
        cuda = self.device.type == "cuda"
        if cuda and self.policy.enabled and self.phase == "rollout" and phase != "rollout":
            torch.cuda.empty_cache()
        pin = cuda and self.offload_device.type == "cpu"
        self.moves = []
        for item, obj in itertools.chain(self.modules.items(), self.optimizers.items()):
            target = self.device if on_device[item] else self.offload_device
            src, nbytes = (_move_module if item in MODULES else _move_optimizer)(obj, target, pin)
            if src is not None:
                self.moves.append(Move(phase, item, src, str(target), nbytes))
        if cuda and self.moves:
            torch.cuda.synchronize(self.device)
        self.phase = phase
        return sum(m.bytes for m in self.moves)

    def where(self):
        """``{item: device}`` of each item's tensors (an optimizer without state
        yet: its parameters' device, where the state will be created)."""
        out = {}
        for item, module in self.modules.items():
            first = next(itertools.chain(module.parameters(), module.buffers()), None)
            if first is not None:
                out[item] = str(first.device)
        for item, optimizer in self.optimizers.items():
            first = next((state[key] for state, key in _state_slots(optimizer)), None)
            if first is None:
                first = next((p for g in optimizer.param_groups for p in g["params"]), None)
            if first is not None:
                out[item] = str(first.device)
        return out


def _canonical(device):
    """``device`` as a torch.device with an index for CUDA (tensors report one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _copy(t, target, pin):
    """``t`` on ``target``; pinned host memory when ``pin`` and target is the CPU."""
    if pin and target.type == "cpu":
        return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t, non_blocking=True)
    return t.to(target, non_blocking=True)


def _move_module(module, target, pin):
    """Move params (with grads) and buffers of ``module`` not on ``target`` in
    place (``.data`` swaps keep every reference, optimizers' included, valid;
    ``module.to`` cannot pin). Returns (source device or None, bytes)."""
    src, nbytes = None, 0
    for p in module.parameters():
        if p.device != target:
            src, nbytes = src or str(p.device), nbytes + p.nbytes
            p.data = _copy(p.data, target, pin)
            if p.grad is not None:
                nbytes += p.grad.nbytes
                p.grad = _copy(p.grad, target, pin)
    for b in module.buffers():
        if b.device != target:
            src, nbytes = src or str(b.device), nbytes + b.nbytes
            b.data = _copy(b.data, target, pin)
    return src, nbytes


def _state_slots(optimizer):
    """``(state, key)`` of the optimizer's per-parameter state tensors that
    follow their parameter.

    0-dim tensors (Adam's ``step``) stay where the optimizer put them: CPU for
    the default implementation, which refuses CUDA steps, and the parameter's
    device for fused/capturable ones."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield state, key


def _move_optimizer(optimizer, target, pin):
    """Move the state tensors of ``optimizer`` not on ``target``; returns
    (source device or None, bytes)."""
    src, nbytes = None, 0
    for state, key in _state_slots(optimizer):
        value = state[key]
        if value.device != target:
            src, nbytes = src or str(value.device), nbytes + value.nbytes
            state[key] = _copy(value, target, pin)
    return src, nbytes
