"""FSDP2 (``fully_shard``) for ``train.strategy=fsdp``: the frozen base is sharded across
processes, one unit per transformer block (the model's ``_no_split_modules``) plus the root.

``patch`` runs before sharding, so prefixes, LoRA and adapters live inside the block that
uses them and are sharded with it (FSDP2 allows frozen and trainable parameters in one
unit, and a stage change of ``requires_grad`` after sharding). Every helper here that
gathers is a collective: all ranks call it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..checkpoint import full_value
from .config import ConfigError


def shard(model: nn.Module, device: torch.device, world: int) -> int:
    """``fully_shard`` every transformer block (innermost first), then the root; returns the
    number of FSDP units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"train.strategy=fsdp: {type(model).__name__} names no transformer blocks "
                          "(_no_split_modules is empty), so there is nothing to shard by; use train.strategy=ddp")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh puts each rank on the current device
    mesh = init_device_mesh(device.type, (world,))
    for block in reversed(blocks):  # pre-order reversed: children before their parents
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Set the root now: evaluation may call submodules directly (BLIP-2's generate never runs
    # the root forward), and the first unit to run would otherwise make itself the root.
    model._get_fsdp_state()._lazy_init()
    return len(blocks) + 1


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "reshard") and hasattr(model, "unshard")


@contextlib.contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """Gather the root unit's parameters (embeddings, projections) for code that calls
    submodules without the root forward (``generate`` of BLIP-2 and LLaVA-style models)."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def gather_named(named: list[tuple[str, torch.Tensor]], keep: bool) -> dict[str, torch.Tensor]:
    """CPU copies of whole parameters, one at a time (peak: one full tensor per rank);
    ranks with ``keep=False`` take part in the gathers and drop the results."""
    out = {}
    for name, p in named:
        t = full_value(p.detach())
        if keep:
            out[name] = t.contiguous().cpu()
    return out


@torch.no_grad()
def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded (DTensor) or not."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    param.copy_(distribute_tensor(value.to(device=param.device, dtype=param.dtype), mesh, param.placements))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state gathered whole on rank 0 (empty elsewhere), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s output (read by every rank) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
