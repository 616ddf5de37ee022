"""Packed batches (padding-free training): several documents in one row, each attending only to
itself and to the prefix.

transformers delivers a packed row in two ways, both recognised here once per forward, at the
language model's root, before any layer runs:

- FlashAttention keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
  ``max_length_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``);
- ``position_ids`` that restart at 0 for each document and no ``attention_mask``
  (``DataCollatorWithFlattening()``, TRL's ``padding_free``): the offsets are read from the
  restarts (one host read) and passed on as the keyword arguments above.

The attention function (:mod:`.attention`) then runs :func:`ptpeft_fast.ops.prefix_attention`
with ``cu_seqlens``, and the mask function registered beside it returns no mask for a packed
forward, so the dense ``T × T`` block-diagonal mask transformers would build is never made.

Models that cannot take a packed row refuse it here with the reason (:func:`packing_refusal`).
A packed row must be one row (batch 1): several packed rows keep transformers' dense mask, which
the attention op also honours (exact, not faster).
"""
from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
from torch import nn

from .call_args import ArgReader

__all__ = ["PackedRow", "offsets_from_position_ids", "packing_refusal", "install", "mask_function", "FLASH_KWARGS"]

FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# model types whose inputs cannot be packed, and why (checked at the model's forward)
_REFUSED = {
    "qwen2_vl": "Qwen2-VL's 3-D (temporal, height, width) positions",
    "qwen2_5_vl": "Qwen2.5-VL's 3-D (temporal, height, width) positions",
    "blip_2": "BLIP-2's query tokens are prepended to every row",
    "blip-2": "BLIP-2's query tokens are prepended to every row",
    "instructblip": "InstructBLIP's query tokens are prepended to every row",
}


class PackedRow(NamedTuple):
    """The documents of one packed row: int32 offsets ``[n_docs + 1]``, the longest length and
    the row's length (None where unknown without a host read)."""

    cu_seqlens: torch.Tensor
    max_seqlen: Optional[int]
    tokens: Optional[int] = None


# the packed row of the forward in progress (set at the language root, cleared at the model's
# forward): the mask function reads it, since transformers hands it nothing that tells
_current: dict[str, Optional[PackedRow]] = {"row": None}


def offsets_from_position_ids(position_ids: torch.Tensor) -> Optional[PackedRow]:
    """The documents of a ``[1, T]`` row whose positions restart (``p[i] != p[i-1] + 1``, the rule
    transformers uses), or None when it holds one document or is not one row."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    p = position_ids[0]
    starts = torch.nonzero(p[1:] != p[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    T = p.shape[0]
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.int32)
    return PackedRow(cu, int((cu[1:] - cu[:-1]).max()), T)


def packing_refusal(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot take a packed row (None: it can)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder's decoder attends to the encoder, not to packed documents"
    return _REFUSED.get(getattr(config, "model_type", None))


def _refuse(reason: str) -> ValueError:
    return ValueError(
        f"this model cannot take a packed batch ({reason}): pass padded rows with an attention_mask instead "
        "(packing comes from DataCollatorWithFlattening, TRL's padding_free, or train.packing)")


def install(model: nn.Module, root: Optional[nn.Module]) -> list:
    """Hooks: the model's forward clears the packed state; ``root`` (the language model with a
    prefix; None: none) recognises a packed row and passes its offsets on as FlashAttention
    keywords. A model that cannot pack refuses a packed row at its forward."""
    reason = packing_refusal(model)
    packs = root is not None
    try:
        top = ArgReader(model.forward)
    except (TypeError, ValueError):
        return []

    def at_model(_module, args, kwargs):
        _current["row"] = None
        if reason is not None or not packs:
            if any(kwargs.get(n) is not None for n in FLASH_KWARGS):
                raise _refuse(reason or "its prefix is not in a decoder that packs")
            ids = top.get(args, kwargs, "position_ids")
            if (isinstance(ids, torch.Tensor) and top.get(args, kwargs, "attention_mask") is None
                    and not torch.compiler.is_compiling() and offsets_from_position_ids(ids) is not None):
                raise _refuse(reason or "its prefix is not in a decoder that packs")
        return None

    hooks = [model.register_forward_pre_hook(at_model, with_kwargs=True)]
    if not packs or reason is not None or not _takes_any_keyword(root.forward):
        return hooks
    call = ArgReader(root.forward)

    def at_root(_module, args, kwargs):
        _current["row"] = None
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            if cu.dim() != 1:
                raise ValueError(f"cu_seq_lens_q must be 1-D offsets [n_docs + 1]; got shape {tuple(cu.shape)}")
            max_len = kwargs.get("max_length_q")
            _current["row"] = PackedRow(cu, None if max_len is None else int(max_len))
            return None
        if call.get(args, kwargs, "attention_mask") is not None or torch.compiler.is_compiling():
            return None
        if call.get(args, kwargs, "past_key_values") is not None:
            return None
        ids = call.get(args, kwargs, "position_ids")
        if not isinstance(ids, torch.Tensor):
            return None
        if ids.dim() == 3:
            raise _refuse("3-D (multimodal RoPE) positions")
        row = offsets_from_position_ids(ids)
        if row is None:
            return None
        _current["row"] = row
        return args, {**kwargs, "cu_seq_lens_q": row.cu_seqlens, "cu_seq_lens_k": row.cu_seqlens,
                      "max_length_q": row.max_seqlen, "max_length_k": row.max_seqlen}

    hooks.append(root.register_forward_pre_hook(at_root, with_kwargs=True))
    return hooks


def _takes_any_keyword(forward) -> bool:
    """Whether ``forward`` has ``**kwargs`` (it passes the FlashAttention keywords to its layers)."""
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False


def mask_function(*args, **kwargs):
    """transformers' ``sdpa_mask``, except for the packed row of the forward in progress: None
    (the offsets are the mask; the attention function reads them from its keywords)."""
    from transformers.masking_utils import sdpa_mask

    row = _current["row"]
    if (row is not None and kwargs.get("attention_mask") is None and kwargs.get("batch_size") == 1
            and (row.tokens is None or kwargs.get("q_length") == row.tokens)):
        return None
    return sdpa_mask(*args, **kwargs)
