"""Shared helpers for the Triton kernels: interpreter detection and autotune configs."""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import torch
import triton

# These sources load only as ptpeft_fast.kernels.* (kernels/README.md): a top-level ``kernels`` is
# Hugging Face's package, and running ours under that name from a checkout would stand in for it.
if not __name__.startswith("ptpeft_fast.kernels."):
    raise ImportError(f"{__name__!r} is ptpeft_fast's Triton source loaded as a top-level 'kernels' "
                      "module; import it as 'ptpeft_fast.kernels' (a top-level 'kernels' is Hugging "
                      "Face's package: pip install kernels)")

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


# Shared memory per block (the opt-in maximum) by compute capability: the pruner reads the
# device's own figure at run time; the compile matrix (tools/compile_matrix.py) checks against these.
SMEM_PER_BLOCK: dict[int, int] = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}

# Registers per thread that a config's resident fp32 accumulator tiles may take (of 255): the rest
# holds the streamed operands, addresses and the pipeline. Above it the compile matrix saw spills.
RESIDENT_REGS: int = 64


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_PER_BLOCK[80]))


def configs(gpu: Iterable[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The GPU autotune list, or a single config under the interpreter (no benchmarking)."""
    return [interp] if INTERPRET else list(gpu)


class SmemPruner:
    """``early_config_prune`` that drops configs whose shared memory would not fit.

    ``estimate(named_args, config)`` must be an upper bound of what Triton allocates (the compile
    matrix checks it against each cubin): an underestimate lets the autotuner launch a config that
    fails with "out of resources". sm_80 (A100) offers ~163 KiB per block and sm_90 (H100)
    ~227 KiB; the same list serves both and the larger entries survive only on Hopper.
    ``resident(named_args, config)``, where a runtime size sets a tile (the adapter's bottleneck),
    gives the fp32 accumulator elements a config keeps on chip; configs over :data:`RESIDENT_REGS`
    registers per thread are dropped too (they spill).
    """

    def __init__(self, estimate: Callable[[dict, triton.Config], int],
                 resident: Callable[[dict, triton.Config], int] | None = None) -> None:
        self.estimate = estimate
        self.resident = resident

    def fits(self, named_args: dict, cfg: triton.Config, limit: int) -> bool:
        """Whether ``cfg`` fits ``limit`` bytes of shared memory and the resident-register budget."""
        if self.estimate(named_args, cfg) > limit:
            return False
        return self.resident is None or self.resident(named_args, cfg) <= RESIDENT_REGS * 32 * cfg.num_warps

    def keep(self, cfgs: Iterable[triton.Config], named_args: dict, limit: int) -> list[triton.Config]:
        """The configs of ``cfgs`` that fit (:meth:`fits`), in order; the last one if none does."""
        cfgs = list(cfgs)
        return [c for c in cfgs if self.fits(named_args, c, limit)] or cfgs[-1:]

    def __call__(self, cfgs, named_args, **kwargs) -> list[triton.Config]:
        if INTERPRET or not torch.cuda.is_available():
            return list(cfgs)[:1]
        return self.keep(cfgs, {**named_args, **kwargs}, _smem_limit(torch.cuda.current_device()))


def smem_pruner(estimate: Callable[[dict, triton.Config], int],
                resident: Callable[[dict, triton.Config], int] | None = None) -> dict:
    """``prune_configs_by`` for :func:`triton.autotune`: a :class:`SmemPruner` over ``estimate``
    (and ``resident``)."""
    return {"early_config_prune": SmemPruner(estimate, resident)}
