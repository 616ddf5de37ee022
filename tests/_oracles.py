"""Naive, obviously-correct implementations of the ops: the tests' oracles (test code only).

The specification of each op is its ``"torch"`` dispatch entry in the package (for attention
``ptpeft_fast/ops/attention_reference.py``); these are written independently of it, by
concatenation and plain arithmetic, so that every implementation, the spec included, is checked
against something that shares none of its code. Nothing here is fast or memory-frugal on purpose
(the prefix is concatenated to the keys, the mask is materialised over ``P + S`` keys).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Prefix attention by concatenation: ``softmax([q·Pkᵀ, q·Kᵀ + mask]) @ [Pv; V]``.

    Same arguments and layout as :func:`ptpeft_fast.ops.prefix_attention`. Dropout draws
    its keep-masks in the same order as the op's math path (prefix part ``[B,H,L,P]``
    first, then the real part ``[B,H,L,S]``, each ``torch.rand(float32) >= p``), so a
    test that seeds the generator gets the same masks in both.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    P = prefix_k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        prefix_v = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    keys = torch.cat([prefix_k, k], dim=2).repeat_interleave(G, dim=1)  # [B,H,P+S,D]
    vals = torch.cat([prefix_v, v], dim=2).repeat_interleave(G, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B,H,L,P+S]
    real = scores[..., P:]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            real = real.masked_fill(~attn_mask, float("-inf"))
        else:
            real = real + attn_mask.to(real.dtype)
    elif causal:
        # bottom-right aligned: query i sees real key j iff j <= i + (S - L)
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
        real = real.masked_fill(~allowed, float("-inf"))
    scores = torch.cat([scores[..., :P], real], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        keep_p = torch.rand(B, H, L, P, dtype=torch.float32, device=q.device) >= dropout_p
        keep_r = torch.rand(B, H, L, S, dtype=torch.float32, device=q.device) >= dropout_p
        probs = probs * torch.cat([keep_p, keep_r], dim=-1) / (1.0 - dropout_p)
    return torch.matmul(probs, vals)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    keep: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` with an explicit dropout keep-mask ``keep``."""
    xd = x if keep is None else x * keep / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(xd, lora_a), lora_b)


def adapter_reference(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
    activation: str = "relu",
    residual: bool = True,
) -> torch.Tensor:
    """``x + up(act(down(x)))`` (without ``x +`` when ``residual`` is False)."""
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    y = F.linear(act(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return x + y if residual else y
