"""Row-wise softmax cross-entropy over a chunk of fp32 logits, in place (the fused LM-head loss).

One program per row of ``Z [R, V]`` (fp32, contiguous rows): pass 1 streams the row in BLOCK_V
tiles with an online max / sum of exponentials (per-lane accumulators, merged at the end) and
writes ``lse`` and the target's logit; pass 2 (``HAS_GRAD``) overwrites the row with
``scale · (exp(z - lse) - onehot(target))``, the gradient of the loss with respect to the logits,
which the caller multiplies into ``W`` and ``h``. The GEMMs around it stay torch's (cuBLAS); this
kernel replaces the several elementwise passes over ``[R, V]`` that softmax, the target gather
and the gradient take in torch ops. Only registers: no shared memory, no ``tl.dot``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, smem_pruner

# Far below any logit but finite: -inf - -inf would be NaN in the online merge.
_NEG = tl.constexpr(-1.0e30)


def _smem(args: dict, cfg: triton.Config) -> int:
    # No tiles in shared memory: only the cross-warp scratch of the row reductions (max, sum), a few
    # words per warp; 64 bytes per warp bounds it (the compile matrix checks each cubin against it).
    return 64 * cfg.num_warps


# Each program streams one row in BLOCK_V tiles: wider tiles and more warps for long rows.
_CONFIGS = configs(
    [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in [(2048, 8), (1024, 4), (4096, 8), (512, 2)]],
    triton.Config({"BLOCK_V": 1024}, num_warps=1),
)


@triton.autotune(configs=_CONFIGS, key=["V", "HAS_GRAD"], prune_configs_by=smem_pruner(_smem))
@triton.jit
def _ce_rows_kernel(Z, T, S, LSE, ZY, stride_z, V, HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    target = tl.load(T + row)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], _NEG, tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, x)
        d = d * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(d * tl.exp(m - row_max), 0))
    tl.store(LSE + row, lse)
    tl.store(ZY + row, tl.load(z_row + target))
    if HAS_GRAD:
        scale = tl.load(S + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(z_row + cols, mask=cols < V, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(z_row + cols, g * scale, mask=cols < V)


def ce_rows_(z: torch.Tensor, targets: torch.Tensor, scale: "torch.Tensor | None",
             lse: torch.Tensor, zy: torch.Tensor) -> None:
    """Fill ``lse`` and ``zy`` ``[R]`` (fp32) for rows of ``z [R, V]`` (fp32, unit column stride);
    with ``scale [R]`` overwrite ``z`` with the scaled logits gradient."""
    R, V = z.shape
    has_grad = scale is not None
    _ce_rows_kernel[(R,)](z, targets, scale if has_grad else lse, lse, zy, z.stride(0), V, HAS_GRAD=has_grad)
