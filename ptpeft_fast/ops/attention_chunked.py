r"""Prefix attention by chunks of queries in plain tensor ops, with its backward written out:
the device-agnostic path for what the fused kernels refuse (any mask, fp64, head dims above
Triton's 256, CUDA without Triton) that never builds the ``[B, H, L, P + S]`` scores.

Per chunk of ``c`` queries (``c`` chosen so a chunk's scores stay within :data:`CHUNK_ELEMENTS`),
with query heads grouped by their key/value head (``[B, Hkv, G·c, D]``, so the keys are never
repeated ``G`` times)::

    S2 = s q Kpᵀ      S1 = s q Kᵀ + M          (M: the mask over the real keys, or causality)
    lse = logsumexp([S2 | S1])                 P = exp([S2 | S1] - lse)
    out = P[:, :P] Vp + P[:, P:] V

Backward, recomputing ``P`` from ``lse`` (flash style; ``Δ = rowsum(dO ∘ out)``)::

    dP = dO [Vp; V]ᵀ      dS = P ∘ (dP - Δ)
    dq = s dS [Kp; K]     dK = s dS1ᵀ q     dV = P1ᵀ dO     dKp = s dS2ᵀ q     dVp = P2ᵀ dO

(summed over the batch for a batch-shared prefix, over the query-head groups always). Masked
keys get ``finfo.min`` (not ``-inf``): a query whose real keys are all masked still sees the
prefix, with weight exactly 0 on the real part, and never NaN.

Dropout (``dropout_p > 0``): each chunk draws its keep-mask ``rand >= p`` over ``[prefix | real]``
from a generator seeded with ``seed`` and the chunk's first row (:func:`dropout_keep`), so the
backward regenerates it instead of storing it; ``P`` becomes ``P ∘ keep / (1 - p)`` in the output
and ``dP`` is scaled the same way (``Δ = rowsum(dO ∘ out)`` still holds).
"""
from __future__ import annotations

from typing import Optional

import torch

from .precision import accumulation_dtype

__all__ = ["chunked_forward", "chunked_backward", "dropout_keep", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 24  # scores of one chunk: 64 MiB in fp32


def _chunk(B: int, H: int, L: int, keys: int) -> int:
    return max(1, min(L, CHUNK_ELEMENTS // max(1, B * H * keys)))


def _grouped(x: torch.Tensor, Hkv: int, l0: int, l1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``l0:l1`` of ``x [B, H, L, X]`` as ``[B, Hkv, G·c, X]`` in ``dtype``."""
    B, H, _, X = x.shape
    return x[:, :, l0:l1].reshape(B, Hkv, (H // Hkv) * (l1 - l0), X).to(dtype)


def _real_bias(mask: Optional[torch.Tensor], causal: bool, B: int, H: int, Hkv: int, L: int, S: int,
               l0: int, l1: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """Additive ``[B|1, Hkv, G·c, S]`` bias of chunk ``l0:l1`` over the real keys (None: none)."""
    c, lowest = l1 - l0, torch.finfo(dtype).min
    if mask is not None:
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m[..., l0:l1, :] if m.shape[-2] != 1 else m
        m = m.expand(m.shape[0], H, c, S)
        if m.dtype == torch.bool:
            bias = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, lowest)
        else:
            bias = m.to(dtype).clamp(min=lowest)
        return bias.reshape(bias.shape[0], Hkv, (H // Hkv) * c, S)
    if not causal:
        return None
    i = torch.arange(l0, l1, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    bias = torch.zeros(c, S, dtype=dtype, device=device).masked_fill_(j > i + (S - L), lowest)
    return bias.repeat(H // Hkv, 1).view(1, 1, (H // Hkv) * c, S)


def _prefix_mm(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``a [B, Hkv, M, X] @ p`` with ``p [Hkv, X, Y]`` (batch-shared: broadcast) or ``[B, Hkv, X, Y]``."""
    return torch.matmul(a, p)


def _probs(q: torch.Tensor, k: torch.Tensor, pk: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
           lse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint probabilities ``(P2, P1, lse)`` of a chunk; ``lse`` given: recomputed from it."""
    s2 = _prefix_mm(q, pk.transpose(-1, -2)).mul_(scale)
    s1 = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s1 = s1.add_(bias)
    if lse is None:
        m = (torch.maximum(s2.amax(-1, keepdim=True), s1.amax(-1, keepdim=True)) if s1.shape[-1]
             else s2.amax(-1, keepdim=True))
        lse = (torch.exp(s2 - m).sum(-1, keepdim=True) + torch.exp(s1 - m).sum(-1, keepdim=True)).log_().add_(m)
    return torch.exp(s2.sub_(lse)), torch.exp(s1.sub_(lse)), lse


def dropout_keep(seed: int, l0: int, shape: tuple[int, ...], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask (bool, True = kept) of the chunk starting at query row ``l0``: ``shape`` is
    ``[B, Hkv, G·c, P + S]``, prefix columns first."""
    gen = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + l0) % (1 << 62))
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= dropout_p


def chunked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                    mask: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float = 0.0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, L, D] in q's dtype, lse [B, H, L] fp32/fp64)``; see the module docstring."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    kk, vv = k.to(acc), v.to(acc)
    pk, pv = prefix_k.to(acc), prefix_v.to(acc)
    out = torch.empty(B, Hkv, H // Hkv, L, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, H // Hkv, L, dtype=acc, device=q.device)
    step = _chunk(B, H, L, P + S)
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        qc = _grouped(q, Hkv, l0, l1, acc)
        bias = _real_bias(mask, causal, B, H, Hkv, L, S, l0, l1, acc, q.device)
        p2, p1, lse_c = _probs(qc, kk, pk, bias, scale)
        if dropout_p > 0.0:
            keep = dropout_keep(seed, l0, p2.shape[:-1] + (P + S,), dropout_p, q.device)
            p2 = p2.mul_(keep[..., :P]).div_(1.0 - dropout_p)
            p1 = p1.mul_(keep[..., P:]).div_(1.0 - dropout_p)
        o = _prefix_mm(p2, pv).add_(torch.matmul(p1, vv))
        out[:, :, :, l0:l1] = o.view(B, Hkv, H // Hkv, l1 - l0, D)
        lse[:, :, :, l0:l1] = lse_c.view(B, Hkv, H // Hkv, l1 - l0)
    return out.view(B, H, L, D), lse.view(B, H, L)


def chunked_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                     causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` in the inputs' dtypes."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    G = H // Hkv
    acc = accumulation_dtype(q.dtype)
    kk, vv = k.to(acc), v.to(acc)
    pk, pv = prefix_k.to(acc), prefix_v.to(acc)
    shared = prefix_k.dim() == 3
    dq = torch.empty(B, Hkv, G, L, D, dtype=acc, device=q.device)
    dk, dv = torch.zeros_like(kk), torch.zeros_like(vv)
    dpk4 = torch.zeros(B, Hkv, P, D, dtype=acc, device=q.device)
    dpv4 = torch.zeros_like(dpk4)
    lse4 = lse.view(B, Hkv, G, L)
    step = _chunk(B, H, L, P + S)
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        qc = _grouped(q, Hkv, l0, l1, acc)
        doc = _grouped(grad_out, Hkv, l0, l1, acc)
        oc = _grouped(out, Hkv, l0, l1, acc)
        lse_c = lse4[:, :, :, l0:l1].reshape(B, Hkv, G * (l1 - l0), 1).to(acc)
        bias = _real_bias(mask, causal, B, H, Hkv, L, S, l0, l1, acc, q.device)
        p2, p1, _ = _probs(qc, kk, pk, bias, scale, lse_c)
        delta = (doc * oc).sum(-1, keepdim=True)
        dp2 = _prefix_mm(doc, pv.transpose(-1, -2))
        dp1 = torch.matmul(doc, vv.transpose(-1, -2))
        if dropout_p > 0.0:  # dP through the dropped probabilities; dV and dVp from the dropped ones
            keep = dropout_keep(seed, l0, p2.shape[:-1] + (P + S,), dropout_p, q.device)
            dp2.mul_(keep[..., :P]).div_(1.0 - dropout_p)
            dp1.mul_(keep[..., P:]).div_(1.0 - dropout_p)
        ds2 = (dp2 - delta).mul_(p2)
        ds1 = (dp1 - delta).mul_(p1)
        if dropout_p > 0.0:
            p2 = p2 * keep[..., :P] / (1.0 - dropout_p)
            p1 = p1 * keep[..., P:] / (1.0 - dropout_p)
        dqc = _prefix_mm(ds2, pk).add_(torch.matmul(ds1, kk)).mul_(scale)
        dq[:, :, :, l0:l1] = dqc.view(B, Hkv, G, l1 - l0, D)
        dk.add_(torch.matmul(ds1.transpose(-1, -2), qc), alpha=scale)
        dv.add_(torch.matmul(p1.transpose(-1, -2), doc))
        dpk4.add_(torch.matmul(ds2.transpose(-1, -2), qc), alpha=scale)
        dpv4.add_(torch.matmul(p2.transpose(-1, -2), doc))
    dpk, dpv = (dpk4.sum(0), dpv4.sum(0)) if shared else (dpk4, dpv4)
    return (dq.view(B, H, L, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype),
            dpv.to(prefix_v.dtype))
