"""Fused bottleneck Adapter in Triton: y = x + up(act(down(x))), act in relu|gelu|silu.

Forward (one kernel, one program per BLOCK_M rows): z = x W_dᵀ + b_d is accumulated over d
into a [BLOCK_M, h] register tile (h <= 256), activated on chip, then multiplied by W_uᵀ one
d-chunk at a time with the bias and the residual x added before the single store of y. The
pre-activation z (fp32, M·h values, h/d of x) is written for the backward.

Backward:
- dX kernel (per BLOCK_M rows): da = dY W_u accumulated over d, dz = da ⊙ act'(z) on chip,
  then dX = dY + dz W_d one d-chunk at a time; dz (fp32, M·h) is written for the weight grads.
- weight kernel (per d-chunk): dW_u[c] = dY[:, c]ᵀ act(z), dW_d[:, c] = dzᵀ x[:, c],
  db_u[c] = Σ dY[:, c]; program 0 also writes db_d = Σ dz. Reductions over M are done by
  one program per output tile (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_dim, compute_in_f32, configs, dot_precision, smem_pruner


def _row_smem(args: dict, cfg: triton.Config) -> int:
    # Each d-loop streams a [BLOCK_M, BLOCK_K] row tile and a [BLOCK_H, BLOCK_K] weight tile per stage;
    # the [BLOCK_M, BLOCK_H] activation tile may be staged once more as a dot operand.
    elt = 2 if args.get("COMPUTE_F32") is False else 4
    bm, bk, bh = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], args["BLOCK_H"]
    return elt * (cfg.num_stages * (bm * bk + bh * bk) + bm * bh)


def _col_smem(args: dict, cfg: triton.Config) -> int:
    # Per stage: dY and x tiles [BLOCK_M, BLOCK_K] and the fp32 z and dz tiles [BLOCK_M, BLOCK_H].
    elt = 2 if args.get("COMPUTE_F32") is False else 4
    bm, bk, bh = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], args["BLOCK_H"]
    return cfg.num_stages * (2 * elt * bm * bk + 2 * 4 * bm * bh)


def _row_resident(args: dict, cfg: triton.Config) -> int:
    return cfg.kwargs["BLOCK_M"] * args["BLOCK_H"]  # z (forward) or da (dX), fp32


def _col_resident(args: dict, cfg: triton.Config) -> int:
    return 2 * cfg.kwargs["BLOCK_K"] * args["BLOCK_H"]  # dW_u and dW_d, fp32


# Autotune lists. The pruner drops the entries whose resident fp32 tile would take more than
# RESIDENT_REGS registers per thread at this bottleneck (h = 256 keeps the 8-warp / narrow entries);
# every entry it keeps compiles without a spill in fp16/bf16 on sm_80 and sm_90 (tools/compile_matrix.py).
_ROW_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(64, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2)]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)

# The weight gradients: 64 x 64 tiles spilled on sm_80 even at h = 64; the last entry is the one that fits
# sm_80 at h = 256.
_COL_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(32, 64, 4, 3), (32, 32, 8, 3), (16, 32, 8, 3)]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # exact (erf) GELU, as torch's default
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    else:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))


@triton.autotune(configs=_ROW_CONFIGS, key=["M", "D", "BLOCK_H", "ACT"],
                 prune_configs_by=smem_pruner(_row_smem, _row_resident))
@triton.jit
def _adapter_fwd(
    X, WD, BD, WU, BU, Y, Z,
    M, D, H,
    stride_xm, stride_xd, stride_wdh, stride_wdd, stride_wud, stride_wuh, stride_ym, stride_yd,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, RESIDUAL: tl.constexpr,
    COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    m_ok = offs_m < M
    h_ok = offs_h < H
    z = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wd = tl.load(WD + offs_h[:, None] * stride_wdh + offs_k[None, :] * stride_wdd,
                     mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
            wd = wd.to(tl.float32)
        z += tl.dot(x, tl.trans(wd), input_precision=PREC)
    if HAS_BD:
        z += tl.load(BD + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + offs_m[:, None] * H + offs_h[None, :], z, mask=m_ok[:, None] & h_ok[None, :])
    a = tl.where(h_ok[None, :], _act(z, ACT), 0.0)
    for n0 in range(0, D, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        n_ok = offs_n < D
        wu = tl.load(WU + offs_n[:, None] * stride_wud + offs_h[None, :] * stride_wuh,
                     mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        if COMPUTE_F32:
            wu = wu.to(tl.float32)
        y = tl.dot(a.to(wu.dtype), tl.trans(wu), input_precision=PREC)
        if HAS_BU:
            y += tl.load(BU + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        io = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            # Second read of this x tile: it was streamed moments ago and is normally in L2.
            y += tl.load(X + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xd,
                         mask=io, other=0.0).to(tl.float32)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yd, y.to(Y.dtype.element_ty), mask=io)


@triton.autotune(configs=_ROW_CONFIGS, key=["M", "D", "BLOCK_H", "ACT"],
                 prune_configs_by=smem_pruner(_row_smem, _row_resident))
@triton.jit
def _adapter_bwd_dx(
    DY, WD, WU, Z, DX, DZ,
    M, D, H,
    stride_dym, stride_dyd, stride_wdh, stride_wdd, stride_wud, stride_wuh, stride_dxm, stride_dxd,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    m_ok = offs_m < M
    h_ok = offs_h < H
    da = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for n0 in range(0, D, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        n_ok = offs_n < D
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyd,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(WU + offs_n[:, None] * stride_wud + offs_h[None, :] * stride_wuh,
                     mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
            wu = wu.to(tl.float32)
        da += tl.dot(dy, wu, input_precision=PREC)
    zm = m_ok[:, None] & h_ok[None, :]
    z = tl.load(Z + offs_m[:, None] * H + offs_h[None, :], mask=zm, other=0.0)
    dz = tl.where(zm, da * _act_grad(z, ACT), 0.0)
    tl.store(DZ + offs_m[:, None] * H + offs_h[None, :], dz, mask=zm)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        wd = tl.load(WD + offs_h[:, None] * stride_wdh + offs_k[None, :] * stride_wdd,
                     mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_F32:
            wd = wd.to(tl.float32)
        dx = tl.dot(dz.to(wd.dtype), wd, input_precision=PREC)
        io = m_ok[:, None] & k_ok[None, :]
        if RESIDUAL:
            dx += tl.load(DY + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyd,
                          mask=io, other=0.0).to(tl.float32)
        tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxd, dx.to(DX.dtype.element_ty), mask=io)


@triton.autotune(configs=_COL_CONFIGS, key=["M", "D", "BLOCK_H", "ACT"],
                 prune_configs_by=smem_pruner(_col_smem, _col_resident))
@triton.jit
def _adapter_bwd_w(
    X, DY, Z, DZ, DWD, DWU, DBD, DBU,
    M, D, H,
    stride_xm, stride_xd, stride_dym, stride_dyd, stride_dwdh, stride_dwdd, stride_dwud, stride_dwuh,
    ACT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_H)
    k_ok = offs_k < D
    h_ok = offs_h < H
    dwu = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
    dwd = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
    dbu = tl.zeros([BLOCK_K], tl.float32)
    dbd = tl.zeros([BLOCK_H], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        io = m_ok[:, None] & k_ok[None, :]
        zm = m_ok[:, None] & h_ok[None, :]
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyd, mask=io, other=0.0)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xd, mask=io, other=0.0)
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        z = tl.load(Z + offs_m[:, None] * H + offs_h[None, :], mask=zm, other=0.0)
        dz = tl.load(DZ + offs_m[:, None] * H + offs_h[None, :], mask=zm, other=0.0)
        a = tl.where(zm, _act(z, ACT), 0.0)
        dwu += tl.dot(tl.trans(dy), a.to(dy.dtype), input_precision=PREC)
        dwd += tl.dot(tl.trans(dz.to(x.dtype)), x, input_precision=PREC)
        dbu += tl.sum(dy.to(tl.float32), 0)
        dbd += tl.sum(dz, 0)
    tl.store(DWU + offs_k[:, None] * stride_dwud + offs_h[None, :] * stride_dwuh, dwu.to(DWU.dtype.element_ty),
             mask=k_ok[:, None] & h_ok[None, :])
    tl.store(DWD + offs_h[:, None] * stride_dwdh + offs_k[None, :] * stride_dwdd, dwd.to(DWD.dtype.element_ty),
             mask=h_ok[:, None] & k_ok[None, :])
    tl.store(DBU + offs_k, dbu, mask=k_ok)
    if pid == 0:
        tl.store(DBD + offs_h, dbd, mask=h_ok)


# --------------------------------------------------------------------------- launchers


def adapter_forward(
    x: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor | None, wu: torch.Tensor, bu: torch.Tensor | None,
    y: torch.Tensor, z: torch.Tensor,
    *, act: int, residual: bool,
) -> None:
    """Write ``y`` [M,d] and the fp32 pre-activation ``z`` [M,h] (contiguous)."""
    M, D = x.shape
    H = wd.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _adapter_fwd[grid](
        x, wd, bd if bd is not None else z, wu, bu if bu is not None else z, y, z,
        M, D, H,
        *x.stride(), *wd.stride(), *wu.stride(), *y.stride(),
        ACT=act, HAS_BD=bd is not None, HAS_BU=bu is not None, RESIDUAL=residual,
        COMPUTE_F32=compute_in_f32(x.dtype), PREC=dot_precision(x.dtype), BLOCK_H=block_dim(H),
    )


def adapter_backward_dx(
    dy: torch.Tensor, wd: torch.Tensor, wu: torch.Tensor, z: torch.Tensor, dx: torch.Tensor, dz: torch.Tensor,
    *, act: int, residual: bool,
) -> None:
    """Write ``dx`` [M,d] and ``dz`` [M,h] fp32."""
    M, D = dy.shape
    H = wd.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _adapter_bwd_dx[grid](
        dy, wd, wu, z, dx, dz,
        M, D, H,
        *dy.stride(), *wd.stride(), *wu.stride(), *dx.stride(),
        ACT=act, RESIDUAL=residual, COMPUTE_F32=compute_in_f32(dy.dtype), PREC=dot_precision(dy.dtype),
        BLOCK_H=block_dim(H),
    )


def adapter_backward_w(
    x: torch.Tensor, dy: torch.Tensor, z: torch.Tensor, dz: torch.Tensor,
    dwd: torch.Tensor, dwu: torch.Tensor, dbd: torch.Tensor, dbu: torch.Tensor,
    *, act: int,
) -> None:
    """Write dW_d [h,d], dW_u [d,h] and fp32 db_d [h], db_u [d]."""
    M, D = x.shape
    H = z.shape[1]
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_K"]),)  # noqa: E731
    _adapter_bwd_w[grid](
        x, dy, z, dz, dwd, dwu, dbd, dbu,
        M, D, H,
        *x.stride(), *dy.stride(), *dwd.stride(), *dwu.stride(),
        ACT=act, COMPUTE_F32=compute_in_f32(x.dtype), PREC=dot_precision(x.dtype), BLOCK_H=block_dim(H),
    )
