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
(:func:`ptpeft_fast.ops.softcapped_attention`); the cap applies to the prefix logits as well.

The routes decided here, one line each (everything else is the attention op's dispatch table,
which :func:`ptpeft_fast.ops.explain` reports):

- a soft-capped layer → :func:`ptpeft_fast.ops.softcapped_attention` (no fused path caps logits);
- a layer without a prefix, or inside :func:`ptpeft_fast.disabled` → transformers' SDPA, unchanged
  (for a packed row: with the dense document mask built here, since no mask was built for it);
- a packed row (``cu_seq_lens_q`` among the keywords, no mask: :mod:`ptpeft_fast.packing`) →
  :func:`ptpeft_fast.ops.prefix_attention` with ``cu_seqlens`` (a sliding window shorter than the
  longest document, or a soft cap: with the dense document mask instead);
- otherwise :func:`ptpeft_fast.ops.prefix_decode_step` (the table's ``decode_cpp`` entry, when it
  applies) or :func:`ptpeft_fast.ops.prefix_attention`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops, packing

ATTN_IMPLEMENTATION = "ptpeft"
_registered = False


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, ptpeft_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packing.mask_function)
        _registered = True
    return ATTN_IMPLEMENTATION


def _document_mask(cu_seqlens: torch.Tensor, T: int, window, device: torch.device) -> torch.Tensor:
    """bool ``[1, 1, T, T]``: same document, causal, and within ``window`` keys when given."""
    mask = ops.document_mask(cu_seqlens.to(device), T)
    if window is not None:
        i = torch.arange(T, device=device)
        mask = mask & (i[None, :] > i[:, None] - int(window))[None, None]
    return mask


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
    cu_seqlens = kwargs.get("cu_seq_lens_q") if attention_mask is None and query.shape[0] == 1 else None
    if cu_seqlens is not None:
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        longest = kwargs.get("max_length_q")
        windowed = window is not None and (longest is None or longest > window)
        if layer_prefix is None or windowed or kwargs.get("softcap") is not None:
            # no packed fast path here: the dense document mask (and window), built once per layer call
            attention_mask = _document_mask(cu_seqlens, query.shape[2], window, query.device)
            cu_seqlens = None
        kwargs = {k: v for k, v in kwargs.items() if k not in packing.FLASH_KWARGS}
    if kwargs.get("softcap") is not None:
        # Gemma 2 (and Gemma 3 when configured) cap the logits: tanh(s / c) * c. Neither SDPA nor the
        # fused op can, so such layers take the explicit path, prefix or not.
        prefix = layer_prefix.kv(query.dtype) if layer_prefix is not None else None
        is_causal = kwargs.get("is_causal")
        is_causal = bool(getattr(module, "is_causal", False)) if is_causal is None else is_causal
        return ops.softcapped_attention(query, key, value, attention_mask, scaling, dropout, module.training, prefix,
                                        kwargs["softcap"], is_causal), None
    if layer_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix_k, prefix_v = layer_prefix.kv(query.dtype)
    backend = getattr(module, "_ptpeft_backend", "auto")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    L, S = query.shape[2], key.shape[2]
    if cu_seqlens is not None:
        out = ops.prefix_attention(query, key, value, prefix_k, prefix_v, causal=True, cu_seqlens=cu_seqlens,
                                   max_seqlen=longest, scale=scaling, dropout_p=dropout if module.training else 0.0,
                                   backend=backend)
        return out.transpose(1, 2).contiguous(), None
    if kwargs.get("position_bias") is None and (dropout == 0.0 or not module.training):
        out = ops.prefix_decode_step(query, key, value, prefix_k, prefix_v, attention_mask, scaling, backend,
                                     causal=bool(is_causal and attention_mask is None and L > 1))
        if out is not None:  # a decode step: one C++ call, no argument checks in Python
            return out.transpose(1, 2).contiguous(), None
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
