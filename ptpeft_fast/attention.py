"""The attention function registered with transformers' ``AttentionInterface``.

transformers hands it the attention module; the module's prefix (if any) lives in a
child named by ``module._ptpeft_prefix``. Layers without a prefix run transformers' own
SDPA path unchanged. The mask function registered beside it is transformers' ``sdpa_mask``
(without one, transformers 5 passes ``attention_mask=None`` and padding would be lost):
with padding the mask arrives as bool ``[B,1,L,S]`` (True = attend), without padding as
``None`` and ``module.is_causal`` says whether causality still applies.

Sliding-window layers (Gemma 2/3, Qwen3, Phi-3, Mistral, ...): the window lives in that mask,
which covers the real keys only, so the prefix stays visible to every query, also to queries
whose window no longer reaches the start of the sequence. That is a choice: the prefix is a
per-layer memory, not tokens at positions -P..-1, so it keeps one meaning in every layer type
(a window that hid it would make the prefix vanish for long inputs in exactly the layers
that have no other long-range path). transformers only passes ``None`` for such layers when
the keys fit inside the window, so the bottom-right causal fallback stays exact.

Logit soft-capping (Gemma 2's ``softcap`` kwarg) is honoured on an explicit path
(:func:`_softcapped_attention`); the cap applies to the prefix logits as well.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops

ATTN_IMPLEMENTATION = "ptpeft"
_registered = False


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_IMPLEMENTATION, ptpeft_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def _bottom_right_causal(L: int, S: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    return j <= i + (S - L)


def ptpeft_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Prefix-augmented attention; q ``[B,H,L,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,L,H,D]``."""
    name = getattr(module, "_ptpeft_prefix", None)
    layer_prefix = getattr(module, name) if name is not None else None
    if layer_prefix is not None and not layer_prefix.enabled:
        layer_prefix = None  # inside ptpeft_fast.disabled(model)
    if kwargs.get("softcap") is not None:
        # Gemma 2 (and Gemma 3 when configured) cap the logits: tanh(s / c) * c. Neither SDPA nor the
        # fused op can, so such layers take the explicit path, prefix or not.
        prefix = layer_prefix.kv(query.dtype) if layer_prefix is not None else None
        return _softcapped_attention(module, query, key, value, attention_mask, scaling, dropout, prefix, **kwargs)
    if layer_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    prefix_k, prefix_v = layer_prefix.kv(query.dtype)
    backend = getattr(module, "_ptpeft_backend", "auto")
    if kwargs.get("position_bias") is None and (dropout == 0.0 or not module.training):
        out = ops.prefix_decode_step(query, key, value, prefix_k, prefix_v, attention_mask, scaling, backend)
        if out is not None:  # a decode step: one C++ call, no argument checks in Python
            return out.transpose(1, 2).contiguous(), None
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    L, S = query.shape[2], key.shape[2]
    mask = attention_mask
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        # T5: a float bias over the real keys; fold the mask (or causality) into it.
        bias = position_bias[..., -S:] if position_bias.shape[-1] != S else position_bias
        if mask is None and is_causal and L > 1:
            mask = _bottom_right_causal(L, S, query.device)
        if mask is not None:
            bias = bias.masked_fill(~mask, torch.finfo(bias.dtype).min) if mask.dtype == torch.bool else bias + mask
        mask = bias.to(query.dtype)
    out = ops.prefix_attention(
        query, key, value, prefix_k, prefix_v,
        causal=bool(is_causal and mask is None and L > 1),
        attn_mask=mask,
        scale=scaling,
        dropout_p=dropout if module.training else 0.0,
        backend=backend,
    )
    # contiguous, as transformers' SDPA path returns it: some models .view() the result (Florence-2)
    return out.transpose(1, 2).contiguous(), None


def _softcapped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    softcap: float,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with logits ``tanh(s/c)·c`` over [prefix; real keys], as Gemma 2's eager path.

    The prefix is never masked; the layer's mask (bool or additive) or, without one, the
    bottom-right causal mask applies to the real keys. Plain autograd ops (no fused kernel).
    """
    B, H, L, D = query.shape
    S = key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
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
        mask = _bottom_right_causal(L, S, query.device)
    if mask is not None:
        mask = mask[..., :S]  # as Gemma 2's eager path slices it
        real = scores[..., P:]
        real = real.masked_fill(~mask, torch.finfo(real.dtype).min) if mask.dtype == torch.bool else real + mask
        scores = torch.cat([scores[..., :P], real], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None
