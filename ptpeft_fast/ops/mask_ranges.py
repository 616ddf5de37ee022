"""Masks as per-sequence key ranges: what the Triton attention kernel takes (torch only, no Triton).

A mask is *ranges* when it is key padding (one contiguous run of visible real keys per sequence,
left or right padding) with or without bottom-right causality, as a bool mask or an additive float
mask whose entries are all 0 or -inf/dtype-min. The dispatch table asks :func:`ranges_reason`
before it chooses the Triton implementation; the kernel wrapper converts with :func:`key_range`.
Checking costs one elementwise pass over the mask and one host sync; the result is cached for
the mask tensor object (unchanged version), so the layers of one forward pay once.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

__all__ = ["MaskNotRanges", "mask_to_key_range", "key_range", "ranges_reason"]


class MaskNotRanges(ValueError):
    """The mask is not key padding (+ bottom-right causality); the message says what it is."""


_mask_cache: dict = {"ref": None}


def mask_to_key_range(
    attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Convert a padding (+ bottom-right causal) mask into per-sequence key ranges.

    ``attn_mask`` (bool, True = attend; or additive float with entries 0 / -inf / dtype-min)
    must broadcast to ``[batch, heads, q_len, k_len]``. Returns ``(klo, khi, causal)``: int32
    tensors of shape ``[batch]`` such that real key j is visible to query i iff
    ``klo[b] <= j < khi[b]`` and, if ``causal``, ``j <= i + k_len - q_len``.

    Raises :class:`MaskNotRanges` (a ``ValueError``) for any mask not of that form.
    """
    return key_range(attn_mask, batch, heads, q_len, k_len)[:3]


def key_range(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int):
    """``(klo, khi, causal, unpadded)``, cached for the last mask tensor (object + version).

    Transformers builds one mask per forward and hands it to every layer, so the checks and
    their host syncs run once per forward, not once per layer.
    """
    key = (id(attn_mask), attn_mask._version, tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype,
           batch, heads, q_len, k_len)
    ref = _mask_cache["ref"]
    if ref is not None and ref() is attn_mask and _mask_cache["key"] == key:
        value = _mask_cache["value"]
    else:
        try:
            klo, khi, causal = _mask_to_key_range(attn_mask, batch, heads, q_len, k_len)
            value = (klo, khi, causal, bool(((klo == 0) & (khi == k_len)).all()))
        except MaskNotRanges as e:  # remembered too: the table asks once per layer
            value = e
        try:
            _mask_cache.update(ref=weakref.ref(attn_mask), key=key, value=value)
        except TypeError:  # pragma: no cover - tensors are weak-referenceable
            pass
    if isinstance(value, MaskNotRanges):
        raise MaskNotRanges(str(value))
    return value


def _mask_to_key_range(m: torch.Tensor, B: int, H: int, L: int, S: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if m.dim() > 4:
        raise MaskNotRanges(f"attn_mask has {m.dim()} dims; expected at most 4 ([B,H,L,S])")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    hm = H if m.shape[1] == H else 1
    try:
        m = m.expand(B, hm, L, S)
    except RuntimeError as e:
        raise MaskNotRanges(f"attn_mask of shape {tuple(m.shape)} does not broadcast to {(B, H, L, S)}") from e
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        allowed = m == 0
        blocked = (m == float("-inf")) | (m <= torch.finfo(m.dtype).min / 2)
        if not bool((allowed | blocked).all()):
            raise MaskNotRanges(
                "backend='triton' takes additive float masks only when every entry is 0 or -inf "
                "(a boolean mask in disguise); general biases need backend='torch'"
            )
    else:
        raise MaskNotRanges(f"attn_mask dtype {m.dtype} is neither bool nor floating")
    keys = allowed.any(dim=2).any(dim=1)  # [B, S]: keys some query sees
    idx = torch.arange(S, device=m.device)
    has = keys.any(dim=1)
    first = torch.where(keys, idx, S).amin(dim=1)
    last = torch.where(keys, idx, -1).amax(dim=1)
    klo = torch.where(has, first, 0)
    khi = torch.where(has, last + 1, 0)
    in_range = (idx[None, :] >= klo[:, None]) & (idx[None, :] < khi[:, None])  # [B, S]
    pad_form = in_range[:, None, None, :]
    causal_ok = idx[None, :] <= torch.arange(L, device=m.device)[:, None] + (S - L)  # [L, S]
    causal_form = pad_form & causal_ok
    if torch.equal(allowed, pad_form.expand_as(allowed)):
        causal = False
    elif torch.equal(allowed, causal_form.expand_as(allowed)):
        causal = True
    else:
        raise MaskNotRanges(
            "backend='triton' supports attn_mask only of the form 'key padding (one contiguous "
            "run of real keys per sequence) with or without bottom-right causality'; this mask "
            "is something else (sliding window, per-head pattern, ...): use backend='torch'"
        )
    return klo.to(torch.int32).contiguous(), khi.to(torch.int32).contiguous(), causal


def ranges_reason(attn_mask: Optional[torch.Tensor], batch: int, heads: int, q_len: int, k_len: int) -> Optional[str]:
    """None when the mask is ranges (or absent), else why not (for the dispatch table's reason)."""
    if attn_mask is None:
        return None
    try:
        key_range(attn_mask, batch, heads, q_len, k_len)
    except MaskNotRanges as e:
        return str(e)
    return None
