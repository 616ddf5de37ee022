"""Prefix flash-attention in Triton (FlashAttention-2 style), forward and backward.

Keys are the P prefix keys followed by the S real keys, read from their own pointers (no
concatenation). Visibility is computed, never loaded:

- prefix columns: always visible (design §2);
- real column j for query i: ``klo[b] <= j < khi[b]`` (key padding, left or right) and,
  when causal, ``j <= i + S - L`` (bottom-right aligned);
- packed documents (``VARLEN``, B = 1, L = S, causal): ``KLO``/``KHI`` are then per token, the
  bounds ``[doc_lo[i], doc_hi[i])`` of token i's document, and real column j is visible to query
  i iff ``doc_lo[i] <= j <= i``. A query block reads keys from its first row's document start
  only, and a key block's queries stop at its last key's document end, so key blocks of other
  documents are skipped whole; the prefix part is unchanged (once per query block).

Softmax runs online in the log2 domain (``qk_scale = scale * log2(e)``); the forward saves
``lse2 = m + log2(l)`` per row, so the backward recomputes probabilities as
``exp2(s * qk_scale - lse2)``. A row with no visible key (only possible with P = 0) gets
output 0 and ``lse2 = +inf`` so its gradients are 0.

Dropout (optional, ``DROPOUT`` constexpr): probability (b, h, i, c) over the P + S columns
is kept iff ``tl.rand(seed + b*H + h, i*(P+S) + c) >= p``; forward and backward regenerate
the same mask.

Backward: dK/dV for real keys and for prefix keys come from one kernel (``IS_PREFIX``)
with one program per key block that loops over the GQA query heads of its KV head and, for
a batch-shared prefix, over the batch too, so every gradient element is written by exactly
one program (no atomics). dQ has its own kernel over query blocks.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, block_dim, compute_in_f32, configs, dot_precision, smem_pruner

LOG2E = 1.4426950408889634


# Shared-memory estimates for the pruner: upper bounds of what Triton allocates (the pipelined
# buffers of the streamed tiles, the resident tiles, and a fp32 [BLOCK_M, BLOCK_N] scratch for layout
# conversions); tools/compile_matrix.py checks each against the compiled kernels.
def _fwd_smem(args: dict, cfg: triton.Config) -> int:
    elt = args["Q"].element_size()
    bd, bm, bn = args["BLOCK_D"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * (bm * bd + cfg.num_stages * 2 * bn * bd) + 4 * bm * bn


def _dkdv_smem(args: dict, cfg: triton.Config) -> int:
    # K, V resident; Q and dO streamed.
    elt = args["Q"].element_size()
    bd, bm, bn = args["BLOCK_D"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * (2 * bn * bd + cfg.num_stages * 2 * bm * bd) + 4 * bm * bn


def _dq_smem(args: dict, cfg: triton.Config) -> int:
    # Q and dO resident; K and V streamed.
    elt = args["Q"].element_size()
    bd, bm, bn = args["BLOCK_D"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return elt * (2 * bm * bd + cfg.num_stages * 2 * bn * bd) + 4 * bm * bn


# Autotune lists. Every GPU entry compiles without a register spill for head dims <= 128 in fp16/bf16
# on sm_80 and sm_90, every constexpr branch (tools/compile_matrix.py checks it; docs/kernels.md has the
# figures): the larger tiles that were here (forward 128x128, backward 64x128) spill on both targets.
_FWD_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 64, 8, 2),
            (64, 64, 4, 3),
            (64, 32, 4, 2),  # small L (decode, Q-Former's 32 queries)
        ]
    ],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)

# dQ: a query block stays on chip while key blocks stream (FlashAttention-2's Triton dQ tiles: 128 x 32).
_DQ_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 32, 8, 3),
            (64, 64, 8, 3),
            (64, 32, 4, 2),
        ]
    ],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)

# dK/dV: a key block (K, V and the fp32 dK, dV accumulators) stays on chip while query blocks stream;
# four tiles of BLOCK_N x head dim live in registers, so BLOCK_N x BLOCK_M is kept small (32 x 64 at 8
# warps spilled 16 B with a batch-shared prefix and dropout; 64 x 64 and 64 x 128 spilled more).
# maxnreg: at head dim 64 ptxas gave the 32 x 32 entry 128 registers and an 8 B spill; allowed 255 it
# takes 198 and does not spill.
_DKDV_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r)
        for bm, bn, w, s, r in [
            (16, 128, 8, 3, None),
            (32, 32, 4, 3, 255),
        ]
    ],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, n_lo, n_hi, n_valid_hi, shift, qk_scale, D,
    p_drop, seed_bh, row_len, col_off, row_lo,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
):
    """Online-softmax update over key blocks [n_lo, n_hi); columns >= n_valid_hi masked; with
    VARLEN also columns before the row's document start ``row_lo``.

    With DROPOUT, probability (i, col_off + j) is kept iff
    ``rand(seed_bh, i * row_len + col_off + j) >= p_drop`` (and scaled by 1/(1-p)); the
    normaliser l uses the undropped probabilities, as in FlashAttention.
    """
    offs_nb = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    # Pointer tiles built once and advanced per block (cheap address math on GPU).
    k_ptrs = k_base + (n_lo + offs_nb)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + (n_lo + offs_nb)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_nb
        col_ok = offs_n < n_valid_hi
        ld_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if COMPUTE_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= (offs_m + shift)[:, None])
        if VARLEN:
            visible = visible & (offs_n[None, :] >= row_lo[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # An all-masked row keeps m = -inf; subtracting 0 instead avoids inf - inf = nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = tl.rand(seed_bh, offs_m[:, None] * row_len + (col_off + offs_n)[None, :]) >= p_drop
            p = tl.where(keep, p * (1.0 / (1.0 - p_drop)), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["L", "S", "P", "BLOCK_D", "CAUSAL", "DROPOUT", "VARLEN"],
                 prune_configs_by=smem_pruner(_fwd_smem))
@triton.jit
def _attn_fwd(
    Q, K, V, PK, PV, OUT, LSE2, KLO, KHI,
    qk_scale, p_drop, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, L, S, P, D, GROUP,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    seed_bh = seed + pid_bh  # one Philox key per (batch, head): offsets stay int32
    hkv = h // GROUP  # GQA/MQA: query head h reads KV head h // (H / Hkv)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    if COMPUTE_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Prefix keys: always visible, only the tail of the last block is masked.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, PK + b * stride_pkb + hkv * stride_pkh, PV + b * stride_pvb + hkv * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        offs_m, offs_d, 0, P, P, 0, qk_scale, D,
        p_drop, seed_bh, P + S, 0, offs_m,
        False, DROPOUT, COMPUTE_F32, PREC, BLOCK_N, False,
    )
    k_lo = 0
    k_hi = S
    row_lo = offs_m
    if HAS_PAD:
        k_lo = tl.load(KLO + b)
        k_hi = tl.load(KHI + b)
    if VARLEN:
        row_lo = tl.load(KLO + offs_m, mask=row_ok, other=0)
        k_lo = tl.load(KLO + start_m)  # rows are in order: the first row's document starts first
    shift = S - L
    n_hi = k_hi
    if CAUSAL:
        # The last row of this block sees keys up to start_m + BLOCK_M - 1 + shift.
        n_hi = tl.minimum(k_hi, start_m + BLOCK_M + shift)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, k_lo, n_hi, k_hi, shift, qk_scale, D,
        p_drop, seed_bh, P + S, P, row_lo,
        CAUSAL, DROPOUT, COMPUTE_F32, PREC, BLOCK_N, VARLEN,
    )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(LSE2 + pid_bh.to(tl.int64) * L + offs_m, lse2, mask=row_ok)


@triton.autotune(configs=_DKDV_CONFIGS,
                 key=["L", "S", "NKEYS", "BLOCK_D", "CAUSAL", "IS_PREFIX", "BATCH_SHARED", "DROPOUT", "VARLEN"],
                 prune_configs_by=smem_pruner(_dkdv_smem))
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV, KLO, KHI,
    qk_scale, scale, p_drop, seed, ROW_LEN, COL_OFF,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    B, H, HKV, L, S, NKEYS, D, GROUP,
    IS_PREFIX: tl.constexpr, BATCH_SHARED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """dK, dV for one block of NKEYS keys (real keys, or prefix keys when IS_PREFIX)."""
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    if BATCH_SHARED:
        # One program owns a prefix block of one KV head and sums over the whole batch.
        hkv = pid.to(tl.int64)
        b_lo = 0
        b_hi = B
    else:
        hkv = (pid % HKV).to(tl.int64)
        b_lo = pid // HKV
        b_hi = b_lo + 1
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    col_in = offs_n < NKEYS
    kb = b_lo.to(tl.int64)  # stride_kb is 0 for a batch-shared prefix
    k = tl.load(K + kb * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_in[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + kb * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_in[:, None] & d_ok[None, :], other=0.0)
    if COMPUTE_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    shift = S - L
    offs_n_shift = offs_n - shift  # key j is visible to query i iff j - shift <= i
    offs_mb = tl.arange(0, BLOCK_M)
    for bi in range(b_lo, b_hi):
        bb = tl.cast(bi, tl.int64)
        col_ok = col_in
        m_lo = 0
        m_hi = L
        if not IS_PREFIX:
            if HAS_PAD:
                k_lo = tl.load(KLO + bb)
                k_hi = tl.load(KHI + bb)
                col_ok = col_ok & (offs_n >= k_lo) & (offs_n < k_hi)
                # A key block wholly outside this sequence's keys gets no queries (dk = dv = 0).
                outside = (start_n + BLOCK_N <= k_lo) | (start_n >= k_hi)
                m_hi = L * (1 - outside.to(tl.int32))
            if CAUSAL:
                # Key j is first seen by query j - shift; start at that query's block.
                m_lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
            if VARLEN:
                # key j is seen by the queries of its document from j on: up to its document's end
                doc_hi_n = tl.load(KHI + offs_n, mask=col_in, other=0)
                m_hi = tl.load(KHI + tl.minimum(start_n + BLOCK_N, NKEYS) - 1)
        for hg in range(0, GROUP):
            h = hkv * GROUP + hg
            row_base = (bb * H + h) * L
            seed_bh = seed + bb * H + h
            q_ptrs = (Q + bb * stride_qb + h * stride_qh
                      + (m_lo + offs_mb)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
            do_ptrs = (DO + bb * stride_dob + h * stride_doh
                       + (m_lo + offs_mb)[:, None] * stride_dom + offs_d[None, :] * stride_dod)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_mb
                row_ok = offs_m < L
                ld = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_ptrs, mask=ld, other=0.0)
                do = tl.load(do_ptrs, mask=ld, other=0.0)
                q_ptrs += BLOCK_M * stride_qm
                do_ptrs += BLOCK_M * stride_dom
                if COMPUTE_F32:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse2 = tl.load(LSE2 + row_base + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
                # Transposed tiles [BLOCK_N, BLOCK_M]: keys on rows, queries on columns.
                s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
                p_t = tl.math.exp2(s_t - lse2[None, :])
                visible = col_ok[:, None] & row_ok[None, :]
                if not IS_PREFIX:
                    if CAUSAL:
                        visible = visible & (offs_n_shift[:, None] <= offs_m[None, :])
                    if VARLEN:
                        visible = visible & (offs_m[None, :] < doc_hi_n[:, None])
                p_t = tl.where(visible, p_t, 0.0)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
                if DROPOUT:
                    keep_t = tl.rand(seed_bh, offs_m[None, :] * ROW_LEN + (COL_OFF + offs_n)[:, None]) >= p_drop
                    dv += tl.dot(tl.where(keep_t, p_t * (1.0 / (1.0 - p_drop)), 0.0).to(do.dtype), do,
                                 input_precision=PREC)
                    dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - p_drop)), 0.0)
                else:
                    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    st = col_in[:, None] & d_ok[None, :]
    tl.store(DK + kb * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=st)
    tl.store(DV + kb * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=st)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, n_lo, n_hi, n_valid_hi, shift, qk_scale, D,
    p_drop, seed_bh, row_len, col_off, row_lo,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
):
    offs_nb = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    k_ptrs = k_base + (n_lo + offs_nb)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + (n_lo + offs_nb)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_nb
        col_ok = offs_n < n_valid_hi
        ld_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if COMPUTE_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= (offs_m + shift)[:, None])
        if VARLEN:
            visible = visible & (offs_n[None, :] >= row_lo[:, None])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = tl.rand(seed_bh, offs_m[:, None] * row_len + (col_off + offs_n)[None, :]) >= p_drop
            dp = tl.where(keep, dp * (1.0 / (1.0 - p_drop)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["L", "S", "P", "BLOCK_D", "CAUSAL", "DROPOUT", "VARLEN"],
                 prune_configs_by=smem_pruner(_dq_smem))
@triton.jit
def _attn_bwd_dq(
    Q, K, V, PK, PV, DO, LSE2, DELTA, DQ, KLO, KHI,
    qk_scale, scale, p_drop, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, L, S, P, D, GROUP,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    seed_bh = seed + pid_bh  # one Philox key per (batch, head): offsets stay int32
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    ld = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=ld, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=ld, other=0.0)
    if COMPUTE_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE2 + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(
        dq, q, do, lse2, delta, PK + b * stride_pkb + hkv * stride_pkh, PV + b * stride_pvb + hkv * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        offs_m, offs_d, 0, P, P, 0, qk_scale, D,
        p_drop, seed_bh, P + S, 0, offs_m,
        False, DROPOUT, COMPUTE_F32, PREC, BLOCK_N, False,
    )
    k_lo = 0
    k_hi = S
    row_lo = offs_m
    if HAS_PAD:
        k_lo = tl.load(KLO + b)
        k_hi = tl.load(KHI + b)
    if VARLEN:
        row_lo = tl.load(KLO + offs_m, mask=row_ok, other=0)
        k_lo = tl.load(KLO + start_m)  # rows are in order: the first row's document starts first
    shift = S - L
    n_hi = k_hi
    if CAUSAL:
        n_hi = tl.minimum(k_hi, start_m + BLOCK_M + shift)
    dq = _dq_inner(
        dq, q, do, lse2, delta, K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, k_lo, n_hi, k_hi, shift, qk_scale, D,
        p_drop, seed_bh, P + S, P, row_lo,
        CAUSAL, DROPOUT, COMPUTE_F32, PREC, BLOCK_N, VARLEN,
    )
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=ld)


@triton.jit
def _attn_keep_kernel(OUT, H, L, NCOL, p_drop, seed, BLOCK: tl.constexpr):
    """keep[b, h, i, c] for c over [prefix ; real keys], the stream the kernels draw."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs_m < L
    for c0 in range(0, NCOL, BLOCK):
        offs_c = c0 + tl.arange(0, BLOCK)
        keep = tl.rand(seed + pid_bh, offs_m[:, None] * NCOL + offs_c[None, :]) >= p_drop
        tl.store(OUT + (pid_bh.to(tl.int64) * L + offs_m[:, None]) * NCOL + offs_c[None, :], keep.to(tl.int8),
                 mask=m_ok[:, None] & (offs_c[None, :] < NCOL))


# --------------------------------------------------------------------------- launchers


def _s4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D view; a 3-D batch-shared prefix gets batch stride 0."""
    if t.dim() == 3:
        return (0,) + tuple(t.stride())
    return tuple(t.stride())


def attn_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
    out: torch.Tensor, lse2: torch.Tensor, klo: torch.Tensor | None, khi: torch.Tensor | None,
    *, causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0, varlen: bool = False,
) -> None:
    """Launch the forward: writes ``out`` [B,H,L,D] and ``lse2`` [B,H,L] (fp32, log2 domain).

    ``klo``/``khi`` (int32 [B]) give each sequence's visible real-key range, or None for all; with
    ``varlen`` (packed documents: B = 1, L = S, causal) they are per token, ``[doc_lo, doc_hi)``.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = pk.shape[-2]
    has_pad = klo is not None and not varlen
    if klo is None:
        klo = khi = lse2  # never read: HAS_PAD and VARLEN are constexprs
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, pk, pv, out, lse2, klo, khi,
        scale * LOG2E, dropout_p, seed,
        *q.stride(), *k.stride(), *v.stride(), *_s4(pk), *_s4(pv), *out.stride(),
        H, L, S, P, D, H // Hkv,
        CAUSAL=causal, HAS_PAD=has_pad, DROPOUT=dropout_p > 0, COMPUTE_F32=compute_in_f32(q.dtype),
        PREC=dot_precision(q.dtype), BLOCK_D=block_dim(D), VARLEN=varlen,
    )


def attn_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
    out: torch.Tensor, dout: torch.Tensor, lse2: torch.Tensor,
    klo: torch.Tensor | None, khi: torch.Tensor | None,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dpk: torch.Tensor, dpv: torch.Tensor,
    *, causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0, varlen: bool = False,
) -> None:
    """Launch the backward kernels, writing dq, dk, dv, dpk, dpv (shaped like their inputs);
    ``klo``/``khi``/``varlen`` as for :func:`attn_forward`."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = pk.shape[-2]
    group = H // Hkv
    has_pad = klo is not None and not varlen
    # delta_i = rowsum(dO_i * O_i): one cheap elementwise pass (FA2's preprocess).
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    if klo is None:
        klo = khi = delta
    f32 = compute_in_f32(q.dtype)
    prec = dot_precision(q.dtype)
    bd = block_dim(D)
    common = dict(CAUSAL=causal, HAS_PAD=has_pad, DROPOUT=dropout_p > 0, COMPUTE_F32=f32, PREC=prec, BLOCK_D=bd,
                  VARLEN=varlen)
    if S > 0:
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        _attn_bwd_dkdv[grid](
            q, k, v, dout, lse2, delta, dk, dv, klo, khi,
            scale * LOG2E, scale, dropout_p, seed, P + S, P,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            B, H, Hkv, L, S, S, D, group,
            IS_PREFIX=False, BATCH_SHARED=False, **common,
        )
    if P > 0:
        shared = pk.dim() == 3
        grid = lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), (1 if shared else B) * Hkv)  # noqa: E731
        _attn_bwd_dkdv[grid](
            q, pk, pv, dout, lse2, delta, dpk, dpv, klo, khi,
            scale * LOG2E, scale, dropout_p, seed, P + S, 0,
            *q.stride(), *_s4(pk), *_s4(pv), *dout.stride(), *_s4(dpk), *_s4(dpv),
            B, H, Hkv, L, S, P, D, group,
            IS_PREFIX=True, BATCH_SHARED=shared, **common,
        )
    if L > 0:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_bwd_dq[grid](
            q, k, v, pk, pv, dout, lse2, delta, dq, klo, khi,
            scale * LOG2E, scale, dropout_p, seed,
            *q.stride(), *k.stride(), *v.stride(), *_s4(pk), *_s4(pv), *dout.stride(), *dq.stride(),
            H, L, S, P, D, group,
            **common,
        )


def dropout_keep_mask(B: int, H: int, L: int, n_keys: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The attention-dropout keep mask (bool ``[B,H,L,P+S]``) the kernels use for ``seed``."""
    out = torch.empty((B, H, L, n_keys), dtype=torch.int8, device=device)
    blk = 32
    _attn_keep_kernel[(triton.cdiv(L, blk), B * H)](out, H, L, n_keys, dropout_p, seed, BLOCK=blk)
    return out.bool()


def default_scale(head_dim: int) -> float:
    """1/sqrt(d_head), the softmax scale when the layer gives none."""
    return 1.0 / math.sqrt(head_dim)


__all__ = ["attn_forward", "attn_backward", "default_scale", "dropout_keep_mask", "INTERPRET"]
