"""Scale-out on torch.distributed: the process layout, the collectives the
engine and the pipeline need, FSDP2 sharding, and failures that name the
rank that failed.

Launch with ``torchrun`` (one process per GPU, or per CPU rank with gloo)
and call :func:`init` first; a process started without torchrun is a
world of one and none of this costs anything::

    layout = distributed.init(timeout_s=600)     # NCCL on GPUs, gloo on CPUs
    with distributed.guard("training"):          # a dead rank -> RankFailureError naming it
        ...

Every rank runs the same program on its own rows of the global batch; the
functions here keep global quantities global (sums over ranks) so that
results do not depend on the world size.

The modules: :mod:`~rlhf_engine.distributed.group` (the process group, the
layout, the collectives, :func:`guard`), :mod:`~rlhf_engine.distributed.fsdp`
(FSDP2 sharding and unsharded views) and
:mod:`~rlhf_engine.distributed.heartbeat` (the heartbeat that names a dead
or frozen rank).
"""
from rlhf_engine.distributed.fsdp import (
    call_as_forward,
    decoder_layers,
    full_state_dict,
    is_sharded,
    local_value,
    set_gradient_sync,
    shard,
    unsharded,
)
from rlhf_engine.distributed.group import (
    DisagreementError,
    Layout,
    RankFailureError,
    all_gather_object,
    all_gather_rows,
    all_reduce,
    check_agreement,
    device_for,
    guard,
    init,
    layout,
    rows_of_rank,
    shutdown,
)
from rlhf_engine.distributed.heartbeat import HEARTBEAT_SECONDS, _Heartbeat, describe, failed_ranks

__all__ = [
    "HEARTBEAT_SECONDS", "DisagreementError", "Layout", "RankFailureError", "all_gather_object", "all_gather_rows",
    "all_reduce", "call_as_forward", "check_agreement", "decoder_layers", "describe", "device_for", "failed_ranks",
    "full_state_dict", "guard", "init", "is_sharded", "layout", "local_value", "rows_of_rank", "set_gradient_sync",
    "shard", "shutdown", "unsharded",
]
