"""Prefix attention through xformers' ``memory_efficient_attention`` (CUDA only, lazy import).

The prefix is concatenated in front of the real keys (xformers has no second key pointer),
GQA/MQA use xformers' 5-D ``[B, M, G, H, K]`` layout with the KV heads expanded (a view, no
copy). Masks:

- no mask, causal, ``S >= L``: ``LowerTriangularFromBottomRightMask`` over the P + S keys,
  which keeps every prefix key visible (query i sees key j iff j <= i + P + S - L);
- no mask, not causal: no bias;
- anything else (a mask, or causal with ``L > S``): a dense additive bias
  ``[B, H, L, P + S]`` with zeros over the prefix, in storage padded to a multiple of 8 keys
  as xformers requires.

Dropout is passed through to xformers (its own RNG).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["prefix_attention"]


def _import_xformers():
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except Exception as e:  # ImportError or a broken CUDA build
        raise ValueError(
            "backend='xformers' needs a working xformers (pip install 'ptpeft_fast[xformers]'); "
            "use backend='torch' or 'triton'"
        ) from e
    return xops, fmha


def _dense_bias(attn_mask: Optional[torch.Tensor], causal: bool, B: int, H: int, L: int, S: int, P: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive bias ``[B,H,L,P+S]`` (prefix columns 0) in 8-aligned storage."""
    n = P + S
    padded = (n + 7) // 8 * 8
    buf = torch.zeros(B, H, L, padded, dtype=dtype, device=device)
    real = buf[..., P:n]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            real.masked_fill_(~attn_mask.expand(B, H, L, S), float("-inf"))
        else:
            real.add_(attn_mask.to(dtype).expand(B, H, L, S))
    elif causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)
        real.masked_fill_(~allowed, float("-inf"))
    return buf[..., :n]


def prefix_attention(
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
    """Same contract as :func:`ptpeft_fast.ops.prefix_attention` (see design §2), on xformers.

    q ``[B,H,L,D]``; k, v ``[B,Hkv,S,D]``; prefix ``[Hkv,P,D]`` or ``[B,Hkv,P,D]``. Returns
    ``[B,H,L,D]``. Raises ``ValueError`` on CPU tensors or when xformers is missing.
    """
    if not q.is_cuda:
        raise ValueError("backend='xformers' needs CUDA tensors; use backend='torch' on CPU")
    xops, fmha = _import_xformers()
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    P = prefix_k.shape[-2]
    dt = q.dtype
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        prefix_v = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    keys = torch.cat([prefix_k.to(dt), k.to(dt)], dim=2).transpose(1, 2)  # [B, P+S, Hkv, D]
    vals = torch.cat([prefix_v.to(dt), v.to(dt)], dim=2).transpose(1, 2)
    # Query head h = g_kv * G + j reads KV head g_kv: xformers' [B, M, G, H, K] groups.
    q5 = q.transpose(1, 2).reshape(B, L, Hkv, G, D)
    k5 = keys.unsqueeze(3).expand(B, P + S, Hkv, G, D)
    v5 = vals.unsqueeze(3).expand(B, P + S, Hkv, G, D)
    if attn_mask is None and not causal:
        bias = None
    elif attn_mask is None and causal and S >= L:
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
    else:
        bias = _dense_bias(attn_mask, causal, B, H, L, S, P, dt, q.device).view(B, Hkv, G, L, P + S)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, p=float(dropout_p), scale=scale)
    return out.reshape(B, L, H, D).transpose(1, 2)
