"""Prefix attention in plain autograd ops: the ``"torch"`` entry of the dispatch table, the
specification every other implementation is tested against, and what runs where no fused path
applies (attention dropout without Triton, a float mask that requires grad such as T5's trained
position bias, empty sizes).

The scores are computed as two pieces (prefix, real keys) and softmaxed jointly; the prefix is
never expanded over the batch. Dropout keep-masks are drawn prefix part first (``[B,H,L,P]``)
then real part (``[B,H,L,S]``), each as ``torch.rand(..., dtype=torch.float32) >= p`` from torch's
default generator (``torch.manual_seed`` reproduces them).

:func:`softcapped_attention` is Gemma 2's logit soft-capping (``tanh(s / c)·c``) over
``[prefix; real keys]``, for layers with or without a prefix.
"""
from __future__ import annotations

from typing import Optional

import torch

from .precision import accumulation_dtype

__all__ = ["reference_attention", "softcapped_attention"]


def _causal_allowed(L: int, S: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - L)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, scale: float,
                        dropout_p: float) -> torch.Tensor:
    """``[B, H, L, D]`` in q's dtype. ``mask``: None, bool (True = attend) or additive float over the
    real keys; without one, ``causal`` gives the bottom-right-aligned causal mask."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    P = prefix_k.shape[-2]
    acc = accumulation_dtype(q.dtype)

    def prefix_mm(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # per-batch matmuls against the shared prefix (no broadcast copy of it)
        if p.dim() == 4 or a.shape[0] == 0:
            return torch.matmul(a, p)
        return torch.stack([a[b] @ p for b in range(a.shape[0])])

    qg = q.reshape(B, Hkv, G * L, D).to(acc)
    s1 = torch.matmul(qg, k.to(acc).transpose(-1, -2)).mul(scale).view(B, H, L, S)
    if mask is not None:
        s1 = s1.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s1 + mask.to(acc)
    elif causal and L > 1:
        s1 = s1.masked_fill(~_causal_allowed(L, S, q.device), float("-inf"))
    s1 = s1.view(B, Hkv, G * L, S)
    s2 = prefix_mm(qg, prefix_k.to(acc).transpose(-1, -2)).mul(scale)  # [B, Hkv, G·L, P]
    if S == 0:
        m = s2.amax(dim=-1, keepdim=True).detach()
    else:
        m = torch.maximum(s1.amax(dim=-1, keepdim=True), s2.amax(dim=-1, keepdim=True)).detach()
    e1, e2 = torch.exp(s1 - m), torch.exp(s2 - m)
    denom = e1.sum(dim=-1, keepdim=True) + e2.sum(dim=-1, keepdim=True)
    p1, p2 = e1 / denom, e2 / denom
    if dropout_p > 0.0:
        keep_p = torch.rand(B, H, L, P, dtype=torch.float32, device=q.device) >= dropout_p
        keep_r = torch.rand(B, H, L, S, dtype=torch.float32, device=q.device) >= dropout_p
        p2 = p2 * keep_p.view(B, Hkv, G * L, P) / (1.0 - dropout_p)
        p1 = p1 * keep_r.view(B, Hkv, G * L, S) / (1.0 - dropout_p)
    out = torch.matmul(p1, v.to(acc)) + prefix_mm(p2, prefix_v.to(acc))
    return out.view(B, H, L, D).to(q.dtype)


def softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float], dropout: float,
                         training: bool, prefix: Optional[tuple[torch.Tensor, torch.Tensor]], softcap: float,
                         is_causal: bool) -> torch.Tensor:
    """Attention with logits ``tanh(s/c)·c`` over ``[prefix; real keys]``, as Gemma 2's eager path;
    returns ``[B, L, H, D]`` (transformers' layout). The prefix is never masked; the layer's mask
    (bool or additive, sliced to the real keys as Gemma 2 does) or, without one, the bottom-right
    causal mask applies to the real keys. The cap applies to the prefix logits as well."""
    B, H, L, D = query.shape
    S = key.shape[2]
    if prefix is not None:
        pk, pv = prefix
        if pk.dim() == 3:
            pk, pv = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    P = key.shape[2] - S
    groups = H // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask
    if mask is None and is_causal and L > 1:
        mask = _causal_allowed(L, S, query.device)
    if mask is not None:
        mask = mask[..., :S]
        real = scores[..., P:]
        real = real.masked_fill(~mask, torch.finfo(real.dtype).min) if mask.dtype == torch.bool else real + mask
        scores = torch.cat([scores[..., :P], real], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()
