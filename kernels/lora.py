"""Fused LoRA linear in Triton: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

Forward (one kernel): each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K once;
every x tile it loads feeds both ``x Wᵀ`` and the rank-r product ``drop(x) Aᵀ``, and the
``[BLOCK_M, r]`` intermediate t never leaves the chip before ``t Bᵀ`` is added. The N-tile-0
programs also write t (fp32, M·r values, r/K of x) for dB.

Backward:
- ``dX = dY W + s · drop'((dY B) A)`` in one kernel with the same structure (dY tile read
  once for both products); the K-tile-0 programs write ``u = s · dY B`` for dA.
- ``dA = uᵀ drop(x)`` and ``dB = s · dYᵀ t`` in one launch (programs split between them),
  each a reduction over M done by one program per output tile (no atomics).
- dW (only when the weight trains) is a plain GEMM left to cuBLAS by the wrapper.

Dropout: the keep mask is ``tl.rand(seed, m*K + k) >= p``, regenerated in the backward from
the same seed, never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_dim, compute_in_f32, configs, dot_precision, smem_pruner


# Shared-memory estimates for the pruner: upper bounds of what Triton allocates (checked against the
# compiled kernels by tools/compile_matrix.py).
def _fwd_smem(args: dict, cfg: triton.Config) -> int:
    # Per stage: x [M, K], W [N, K] and A [r, K] tiles; then the B tile [N, r] and t [M, r] once.
    elt = 2 if args.get("COMPUTE_F32") is False else 4
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args["BLOCK_R"]
    return elt * cfg.num_stages * (bm * bk + bn * bk + br * bk) + elt * bn * br + 4 * bm * br


def _dx_smem(args: dict, cfg: triton.Config) -> int:
    # Per stage: dY [M, N], W [N, K] and B [N, r] tiles; then the A tile [r, K] and u [M, r] once.
    elt = 2 if args.get("COMPUTE_F32") is False else 4
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args["BLOCK_R"]
    return elt * cfg.num_stages * (bm * bn + bn * bk + bn * br) + elt * br * bk + 4 * bm * br


def _red_smem(args: dict, cfg: triton.Config) -> int:
    # dA's loop streams x [M, K] and u [M, r] (fp32), dB's dY [M, N] and t [M, r] (fp32); counted as if
    # both loops' buffers were live at once.
    elt = 2 if args.get("COMPUTE_F32") is False else 4
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    br = args["BLOCK_R"]
    return cfg.num_stages * (elt * bm * (bk + bn) + 2 * 4 * bm * br)


# Autotune lists. Every GPU entry compiles without a register spill in fp16/bf16 on sm_80 and sm_90
# (tools/compile_matrix.py checks it; docs/kernels.md has the figures); 128 x 256 output tiles spilled.
# Forward: a [BLOCK_M, BLOCK_N] tile of y, K streamed in BLOCK_K steps.
_FWD_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 32, 8, 4),
            # 128 x 64 x 32 at 4 warps / 4 stages is left out: it spilled 8 B at r = 64 on sm_80 (dropout).
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 3),
        ]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)

# dX: a [BLOCK_M, BLOCK_K] tile of dX, N streamed in BLOCK_N steps.
_DX_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),  # fits sm_90's shared memory only
            (128, 64, 64, 8, 3),
            # 64 x 64 x 128 at 4 warps / 4 stages is left out: it spilled 8-32 B at r = 8 and 64.
            (64, 64, 64, 4, 3),
        ]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)

_RED_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(64, 128, 128, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 2)]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
)


@triton.jit
def _keep(seed, offs_m, offs_k, K, p):
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= p


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "BLOCK_R", "DROPOUT"],
                 prune_configs_by=smem_pruner(_fwd_smem))
@triton.jit
def _lora_fwd(
    X, W, BIAS, A, BM_, Y, T,
    M, N, K, R, scaling, p_drop, seed,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        if DROPOUT:
            keep = _keep(seed, offs_m, offs_k, K, p_drop)
            x = tl.where(keep, x * (1.0 / (1.0 - p_drop)), 0.0).to(a.dtype)
        t += tl.dot(x, tl.trans(a), input_precision=PREC)
    bl = tl.load(BM_ + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                 mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    if COMPUTE_F32:
        bl = bl.to(tl.float32)
    acc += scaling * tl.dot(t.to(bl.dtype), tl.trans(bl), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if pid_n == 0:
        tl.store(T + offs_m[:, None] * R + offs_r[None, :], t, mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_DX_CONFIGS, key=["M", "N", "K", "BLOCK_R", "DROPOUT", "NEED_DX"],
                 prune_configs_by=smem_pruner(_dx_smem))
@triton.jit
def _lora_bwd_dx(
    DY, W, A, BM_, DX, U,
    M, N, K, R, scaling, p_drop, seed,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk,
    NEED_DX: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX tile [BLOCK_M, BLOCK_K] = dY W + drop'(s·(dY B) A); K-tile 0 also writes u = s·dY B."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        bl = tl.load(BM_ + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
            bl = bl.to(tl.float32)
        if NEED_DX:
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if COMPUTE_F32:
                w = w.to(tl.float32)
            acc += tl.dot(dy, w, input_precision=PREC)
        u += tl.dot(dy, bl, input_precision=PREC)
    u = u * scaling
    if NEED_DX:
        a = tl.load(A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_F32:
            a = a.to(tl.float32)
        g = tl.dot(u.to(a.dtype), a, input_precision=PREC)
        if DROPOUT:
            keep = _keep(seed, offs_m, offs_k, K, p_drop)
            g = tl.where(keep, g * (1.0 / (1.0 - p_drop)), 0.0)
        tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, (acc + g).to(DX.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])
    if pid_k == 0:
        tl.store(U + offs_m[:, None] * R + offs_r[None, :], u, mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_RED_CONFIGS, key=["M", "N", "K", "BLOCK_R", "DROPOUT"],
                 prune_configs_by=smem_pruner(_red_smem))
@triton.jit
def _lora_bwd_ab(
    X, DY, T, U, DA, DB,
    M, N, K, R, scaling, p_drop, seed,
    stride_xm, stride_xk, stride_dym, stride_dyn,
    stride_dar, stride_dak, stride_dbn, stride_dbr,
    DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Programs [0, cdiv(K, BLOCK_K)) write dA = uᵀ drop(x); the rest write dB = s·dYᵀ t."""
    pid = tl.program_id(0)
    nk = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if pid < nk:
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        acc_a = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if COMPUTE_F32:
                x = x.to(tl.float32)
            if DROPOUT:
                keep = _keep(seed, offs_m, offs_k, K, p_drop)
                x = tl.where(keep, x * (1.0 / (1.0 - p_drop)), 0.0).to(x.dtype)
            u = tl.load(U + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc_a += tl.dot(tl.trans(u.to(x.dtype)), x, input_precision=PREC)
        tl.store(DA + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc_a.to(DA.dtype.element_ty),
                 mask=r_ok[:, None] & k_ok[None, :])
    else:
        offs_n = (pid - nk) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc_b = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        for mb0 in range(0, M, BLOCK_M):
            offs_mb = mb0 + tl.arange(0, BLOCK_M)
            mb_ok = offs_mb < M
            dy = tl.load(DY + offs_mb[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=mb_ok[:, None] & n_ok[None, :], other=0.0)
            if COMPUTE_F32:
                dy = dy.to(tl.float32)
            t = tl.load(T + offs_mb[:, None] * R + offs_r[None, :], mask=mb_ok[:, None] & r_ok[None, :], other=0.0)
            acc_b += tl.dot(tl.trans(dy), t.to(dy.dtype), input_precision=PREC)
        tl.store(DB + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                 (acc_b * scaling).to(DB.dtype.element_ty),
                 mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def _mask_kernel(OUT, M, K, p_drop, seed, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(seed, offs_m, offs_k, K, p_drop)
    tl.store(OUT + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------- launchers


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    y: torch.Tensor, t: torch.Tensor,
    *, scaling: float, dropout_p: float, seed: int,
) -> None:
    """Write ``y`` [M,N] and the fp32 rank intermediate ``t`` [M,r] (contiguous)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _lora_fwd[grid](
        x, weight, bias if bias is not None else y, lora_a, lora_b, y, t,
        M, N, K, R, scaling, dropout_p, seed,
        *x.stride(), *weight.stride(), *lora_a.stride(), *lora_b.stride(), *y.stride(),
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, COMPUTE_F32=compute_in_f32(x.dtype),
        PREC=dot_precision(x.dtype), BLOCK_R=block_dim(R),
    )


def lora_backward_dx(
    dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    dx: torch.Tensor | None, u: torch.Tensor,
    *, scaling: float, dropout_p: float, seed: int,
) -> None:
    """Write ``dx`` [M,K] (if not None) and ``u = s·dY B`` [M,r] fp32."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    need_dx = dx is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]) if need_dx else 1)  # noqa: E731
    _lora_bwd_dx[grid](
        dy, weight, lora_a, lora_b, dx if need_dx else u, u,
        M, N, K, R, scaling, dropout_p, seed,
        *dy.stride(), *weight.stride(), *lora_a.stride(), *lora_b.stride(),
        *(dx.stride() if need_dx else (0, 0)),
        NEED_DX=need_dx, DROPOUT=dropout_p > 0, COMPUTE_F32=compute_in_f32(dy.dtype),
        PREC=dot_precision(dy.dtype), BLOCK_R=block_dim(R),
    )


def lora_backward_ab(
    x: torch.Tensor, dy: torch.Tensor, t: torch.Tensor, u: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
    *, scaling: float, dropout_p: float, seed: int,
) -> None:
    """Write ``da`` [r,K] and ``db`` [N,r]."""
    M, K = x.shape
    N = dy.shape[1]
    R = t.shape[1]
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]) + triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lora_bwd_ab[grid](
        x, dy, t, u, da, db,
        M, N, K, R, scaling, dropout_p, seed,
        *x.stride(), *dy.stride(), *da.stride(), *db.stride(),
        DROPOUT=dropout_p > 0, COMPUTE_F32=compute_in_f32(x.dtype), PREC=dot_precision(x.dtype),
        BLOCK_R=block_dim(R),
    )


def dropout_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Materialise the keep mask the LoRA kernels use for (seed, p), as bool [M, K]."""
    M, K = shape
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    blk = 32
    _mask_kernel[(triton.cdiv(M, blk), triton.cdiv(K, blk))](out, M, K, dropout_p, seed, BLOCK=blk)
    return out.bool()
