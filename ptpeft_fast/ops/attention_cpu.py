r"""The CPU implementations of prefix attention (forward and backward written out; the dispatch
table in :mod:`.prefix_attention` says when each runs).

``block_cpp`` — ``csrc/prefix_flash_cpu.cpp``: per (batch, head, 64 query rows) the scores over
``[Kp; K]`` (prefix keys first, then the real keys the block sees) by BLAS ``sgemm``, one softmax,
the output by ``sgemm``; ``lse`` is kept and the backward recomputes the block's probabilities
(flash style). fp32, a batch-shared prefix (``auto``: up to :data:`FLASH_PREFIX_MAX_KEYS` keys); an additive
mask over the real keys (transformers' padding) is added to the block's scores.

``decode_cpp`` — ``csrc/decode_attention_cpu.cpp``: one pass per (batch, head, query) for calls
without autograd and at most :data:`DECODE_MAX_QUERIES` queries per row (the decode steps of
``generate``), where the ~10 small tensor ops of the other paths cost more than the arithmetic.

``lse_merge`` — the real keys through ATen's CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``, which returns ``O1`` and ``lse1`` and handles
GQA itself), the prefix part by two small batched matmuls, merged by log-sum-exp. With
``S1 = s q Kᵀ + M``, ``S2 = s q Kpᵀ``::

    lse = logaddexp(lse1, logsumexp(S2))      out = exp(lse1 - lse) O1 + exp(S2 - lse) Vp

Backward: the flash backward kernel, handed the FINAL merged ``out`` and ``lse``, rebuilds
``P1 = exp(S1 - lse)`` and ``Δ = rowsum(dO ∘ out)`` from them and so returns exactly the real-key
terms; the prefix terms (``P2 = exp(S2 - lse)`` recomputed, ``L × P`` per head) are added::

    dS2 = P2 ∘ (dO Vpᵀ - Δ)     dq += s dS2 Kp     dKp = s dS2ᵀ q     dVp = P2ᵀ dO

The prefix is never expanded over the batch (query heads grouped by key/value head as
``[B, Hkv, G·L, D]``; one ``bmm`` per batch element against a shared prefix) and no mask over
``P + S`` keys is built. Every dtype (fp16/bf16 accumulate in fp32), any mask that does not
require grad, any length.
"""
from __future__ import annotations

from typing import Optional

import torch

from .precision import accumulation_dtype

__all__ = ["FLASH_PREFIX_MAX_KEYS", "DECODE_MAX_QUERIES", "block_forward", "block_backward", "decode_forward",
           "lse_merge_forward", "lse_merge_backward", "finite_additive", "dense_rows", "kernel_causal"]

# P + S up to which "auto" takes block_cpp (it runs any length when asked for by name). Measured
# fwd+bwd against lse_merge, paired (benchmarks/impl_table.py, B=4 H=8 D=64 P=32, 2 threads):
# 0.75-0.82x at 160 keys, 0.71-0.77x at 544; 0.78x at 1056 keys (B=2 H=32 Hkv=8 D=128, session 6);
# 0.97-1.06x at 2080 and 1.17x at 4128: ATen's key-blocked kernel keeps its scores in cache better.
FLASH_PREFIX_MAX_KEYS = 1600
DECODE_MAX_QUERIES = 8  # queries per row up to which a no-grad call takes decode_cpp

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its head dim has unit stride and its rows do not overlap (what BLAS and ATen's CPU
    kernel need), else a contiguous copy."""
    if t.stride(-1) == 1 and (t.shape[2] <= 1 or t.stride(2) >= t.shape[3]):
        return t
    return t.contiguous()


def finite_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float mask of ``dtype`` with ``-inf`` replaced by ``finfo.min`` (keeps every ``lse`` finite)."""
    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, lowest)
    return mask.to(dtype).clamp(min=lowest)


def _mask4(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _causal_bias(L: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive bottom-right causal mask ``[1, 1, L, S]`` (query i sees key j iff j <= i + S - L)."""
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return torch.zeros(L, S, dtype=dtype, device=device).masked_fill_(
        j > i + (S - L), torch.finfo(dtype).min)[None, None]


def kernel_causal(mask: Optional[torch.Tensor], causal: bool, L: int, S: int) -> bool:
    """Whether the CPU kernels may run with their causal flag on, which skips the key blocks above
    the diagonal (both kernels align it top-left, so only when S == L): causality without a mask,
    or a bool mask with nothing allowed above the diagonal (transformers' causal + padding mask;
    rows it leaves fully masked get weight 0 anyway)."""
    if L <= 1 or S != L:
        return False
    if mask is None:
        return bool(causal)
    if mask.dtype != torch.bool:
        return False
    upper = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu_(1)
    return not bool((mask & upper).any())


# ------------------------------------------------------------------------- block_cpp


def _block_mask(mask: Optional[torch.Tensor], causal: bool, L: int, S: int, device: torch.device):
    """``(additive fp32 mask or None, causal flag)`` for the C++ op."""
    flag = kernel_causal(mask, causal, L, S)
    if mask is None:
        return (_causal_bias(L, S, torch.float32, device) if causal and L > 1 and not flag else None), flag
    m = finite_additive(_mask4(mask), torch.float32)
    return (m if m.stride(-1) == 1 else m.contiguous()), flag


def block_forward(q, k, v, prefix_k, prefix_v, mask, causal: bool, scale: float, cu_seqlens=None):
    """``cu_seqlens``: packed documents (one row, causal, no mask), each a segment of the C++ loop."""
    q, k, v = (dense_rows(t) for t in (q, k, v))
    m, flag = (None, True) if cu_seqlens is not None else _block_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    return torch.ops.ptpeft_fast.flash_prefix_forward(q, k, v, prefix_k.contiguous(), prefix_v.contiguous(), m, flag,
                                                      scale, cu_seqlens)


def block_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal: bool, scale: float, need_qkv: bool,
                   cu_seqlens=None):
    q, k, v = (dense_rows(t) for t in (q, k, v))
    m, flag = (None, True) if cu_seqlens is not None else _block_mask(mask, causal, q.shape[2], k.shape[2], q.device)
    return torch.ops.ptpeft_fast.flash_prefix_backward(dense_rows(grad_out.to(q.dtype)), q, k, v, prefix_k.contiguous(),
                                                       prefix_v.contiguous(), m, out, lse.contiguous(), flag, scale,
                                                       need_qkv, cu_seqlens)


# ------------------------------------------------------------------------- decode_cpp


def decode_forward(q, k, v, prefix_k, prefix_v, mask, causal: bool, scale: float) -> torch.Tensor:
    L, S = q.shape[2], k.shape[2]
    if mask is not None:
        m = finite_additive(_mask4(mask), q.dtype)
    elif causal and L > 1:
        m = _causal_bias(L, S, q.dtype, q.device)
    else:
        m = None
    return torch.ops.ptpeft_fast.prefix_decode_attention(dense_rows(q), dense_rows(k), dense_rows(v),
                                                         prefix_k.contiguous(), prefix_v.contiguous(), m, scale)


# ------------------------------------------------------------------------- lse_merge


def _grp(x: torch.Tensor, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, X]`` → ``[B, Hkv, G·L, X]`` (a view for a contiguous ``x`` of ``dtype``)."""
    B, H, L, X = x.shape
    out = x.reshape(B, Hkv, (H // Hkv) * L, X)
    return out if out.dtype == dtype else out.to(dtype)


def _mm_prefix(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``a [B, Hkv, M, X] @ p``, ``p [Hkv, X, Y]`` (batch-shared: one ``bmm`` per batch element, no
    broadcast copy) or ``[B, Hkv, X, Y]``."""
    if p.dim() == 4:
        return torch.matmul(a, p)
    res = torch.empty(a.shape[:-1] + (p.shape[-1],), dtype=a.dtype, device=a.device)
    for b in range(a.shape[0]):
        torch.bmm(a[b], p, out=res[b])
    return res


def _mm_reduce(a_t: torch.Tensor, c: torch.Tensor, shared: bool) -> torch.Tensor:
    """``a_t [B, Hkv, Y, M] @ c [B, Hkv, M, Z]``, summed over the batch when ``shared``."""
    if not shared:
        return torch.matmul(a_t, c)
    res = torch.bmm(a_t[0], c[0])
    for b in range(1, a_t.shape[0]):
        res.baddbmm_(a_t[b], c[b])
    return res


def _flash_args(q, mask, causal: bool, L: int, S: int):
    """``(additive mask or None, is_causal)`` for ATen's CPU flash kernel."""
    flag = kernel_causal(mask, causal, L, S)
    if mask is None:
        return (_causal_bias(L, S, q.dtype, q.device) if causal and L > 1 and not flag else None), flag
    return finite_additive(_mask4(mask), q.dtype), flag


def lse_merge_forward(q, k, v, prefix_k, prefix_v, mask, causal: bool, scale: float):
    """``(out [B, H, L, D] in q's layout, lse [B, H, L])``; see the module docstring."""
    q, k, v = (dense_rows(t) for t in (q, k, v))
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    m, flash_causal = _flash_args(q, mask, causal, L, S)
    out1, lse1 = _flash_fwd(q, k, v, 0.0, flash_causal, attn_mask=m, scale=scale)
    pk_t = prefix_k.to(acc).transpose(-1, -2).contiguous()
    s2 = _mm_prefix(_grp(q, Hkv, acc), pk_t).mul_(scale)  # [B, Hkv, G·L, P]
    lse1g = lse1.reshape(B, Hkv, -1, 1).to(acc)
    mx = torch.maximum(s2.amax(dim=-1, keepdim=True), lse1g)
    e2 = s2.sub_(mx).exp_()
    w1 = torch.sub(lse1g, mx).exp_()  # unnormalised weight of the real-key part
    denom = e2.sum(dim=-1, keepdim=True).add_(w1)
    p2 = e2.div_(denom)
    w1.div_(denom)
    lse = denom.log_().add_(mx)
    G = H // Hkv
    o2 = _mm_prefix(p2, prefix_v.to(acc)).view(B, Hkv, G, L, D)
    out1_5 = out1.view(B, Hkv, G, L, D)  # the kernel's output follows q's layout: merged through 5-D views
    if out1.dtype == acc:
        out1_5.mul_(w1.view(B, Hkv, G, L, 1)).add_(o2)
    else:  # half precision: merge in fp32, round once
        out1_5.copy_(torch.addcmul(o2, out1_5, w1.view(B, Hkv, G, L, 1)))
    return out1, lse.view(B, H, L)


def lse_merge_backward(grad_out, q, k, v, prefix_k, prefix_v, mask, out, lse, causal: bool, scale: float,
                       need: list[bool]):
    """``(dq, dk, dv, dprefix_k, dprefix_v)``, None where ``need`` is False."""
    q, k, v = (dense_rows(t) for t in (q, k, v))
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = accumulation_dtype(q.dtype)
    shared = prefix_k.dim() == 3
    grad_out = dense_rows(grad_out.to(q.dtype))
    m, flash_causal = _flash_args(q, mask, causal, L, S)
    dq = dk = dv = None
    if need[0] or need[1] or need[2]:  # stage 1's first layer wants none of them: skipped
        dq, dk, dv = _flash_bwd(grad_out, q, k, v, out, lse, 0.0, flash_causal, attn_mask=m, scale=scale)
    lse_g = lse.reshape(B, Hkv, -1, 1).to(acc)
    p2 = _mm_prefix(_grp(q, Hkv, acc), prefix_k.to(acc).transpose(-1, -2).contiguous()).mul_(scale).sub_(lse_g).exp_()
    dog = _grp(grad_out, Hkv, acc)
    delta = torch.linalg.vecdot(dog, _grp(out, Hkv, acc)).unsqueeze(-1)
    ds2 = _mm_prefix(dog, prefix_v.to(acc).transpose(-1, -2).contiguous()).sub_(delta).mul_(p2)
    dpk = (_mm_reduce(ds2.transpose(-1, -2), _grp(q, Hkv, acc), shared).mul_(scale).to(prefix_k.dtype) if need[3]
           else None)
    dpv = _mm_reduce(p2.transpose(-1, -2), dog, shared).to(prefix_v.dtype) if need[4] else None
    if need[0]:
        dq5 = dq.view(B, Hkv, G, L, D)
        extra = _mm_prefix(ds2, prefix_k.to(acc)).view(B, Hkv, G, L, D)
        if dq.dtype == acc:
            dq5.add_(extra, alpha=scale)
        else:
            dq5.copy_(dq5.to(acc).add_(extra, alpha=scale))
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, dpk, dpv)
