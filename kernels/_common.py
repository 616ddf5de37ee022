"""Shared helpers for the Triton kernels: interpreter detection and autotune configs."""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import torch
import triton

# Read once at import: Triton itself fixes interpreter mode when it is imported.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_in_f32(dtype: torch.dtype) -> bool:
    """Whether kernels should upcast loaded tiles to fp32 before arithmetic.

    The interpreter computes bf16 (and ``tl.dot`` on bf16) wrongly, so there every tile is
    upcast right after ``tl.load``; fp32 inputs are fp32 anyway. On a GPU fp16/bf16 keep
    their native tensor-core operands with fp32 accumulation.
    """
    return INTERPRET or dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 inputs (design §5 asks 1e-5)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_dim(n: int, minimum: int = 16) -> int:
    """Power-of-two tile covering ``n`` (``tl.dot`` needs every dim >= 16)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 163 * 1024))


def configs(gpu: Iterable[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The GPU autotune list, or a single config under the interpreter (no benchmarking)."""
    return [interp] if INTERPRET else list(gpu)


def smem_pruner(estimate: Callable[[dict, triton.Config], int]) -> dict:
    """``prune_configs_by`` that drops configs whose shared memory would not fit.

    sm_80 (A100) offers ~163 KiB per block and sm_90 (H100) ~227 KiB; the same list serves
    both and the deeper-pipelined / larger-tile entries survive only on Hopper.
    """

    def prune(cfgs, named_args, **kwargs):
        if INTERPRET or not torch.cuda.is_available():
            return list(cfgs)[:1]
        limit = _smem_limit(torch.cuda.current_device())
        args = {**named_args, **kwargs}
        kept = [c for c in cfgs if estimate(args, c) <= limit]
        return kept or list(cfgs)[-1:]

    return {"early_config_prune": prune}
