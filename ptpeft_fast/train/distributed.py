"""Process-group helpers for torchrun (DDP/FSDP): one place that knows about ``torch.distributed``."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "init_distributed", "all_reduce", "barrier", "shutdown_distributed", "group_failure"]


@dataclass
class DistInfo:
    """Process-group facts; ``world == 1`` means a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce(t: torch.Tensor, di: DistInfo, op: str = "sum") -> torch.Tensor:
    if di.world > 1:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def barrier(di: DistInfo) -> None:
    if di.world > 1:
        import torch.distributed as dist
        dist.barrier()


# How a collective's failure reads when it comes from the transport rather than our code.
_BACKEND_MARKERS = ("third_party/gloo/", "by peer", "NCCL error", "ProcessGroupNCCL")


def shutdown_distributed(ok: bool) -> None:
    """Leave the process group before the interpreter exits (a no-op outside torchrun).

    Without it the gloo backend's worker threads are torn down during interpreter finalisation and
    a rank that finished its work can die in ``std::terminate`` ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489); torchrun then kills the other ranks. Seen
    here in about 1 of 9 two-process runs on a loaded 2-core machine. After a run that succeeded
    every rank first waits for the others, so no rank tears the group down while a peer still
    talks to it; after a failure the group is destroyed without waiting (a barrier could wait for
    a rank that is gone).
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok:
            dist.barrier()
    except dist.DistError as e:  # this rank's work is done and saved; a peer's was not
        print(f"warning: {group_failure(e)}", file=sys.stderr)
    finally:
        dist.destroy_process_group()


def group_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another process of the job stopped, else None.

    When a rank dies, the others fail in whatever collective they were in: gloo raises a plain
    ``RuntimeError`` naming its transport ("Read error ...: Connection reset by peer"), NCCL and the
    store a ``torch.distributed.DistError``. The cause is in the dead rank's own output, which
    torchrun prints as the root cause.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    backend_error = isinstance(e, RuntimeError) and any(m in str(e) for m in _BACKEND_MARKERS)
    if not (isinstance(e, dist.DistError) or backend_error):
        return None
    rank = os.environ.get("RANK", "?")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"rank {rank}: the process group failed ({first[:200]}); another process of this torchrun job "
            "stopped first: its error is the root cause torchrun reports. The last complete checkpoint is kept: "
            "run the same torchrun command with --resume <output folder> to continue")
