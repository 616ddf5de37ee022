"""A patched causal LM's training loss through :func:`ptpeft_fast.ops.linear_cross_entropy`.

When a patched model is called **in training mode with ``labels``** (``PTPeftConfig.fused_loss``,
on by default), the loss comes from the last hidden state through the fused op and the
``[B, T, V]`` logits are never computed: the output's ``logits`` is ``None``. In eval mode,
without labels, inside :func:`ptpeft_fast.disabled` and in ``generate`` the model computes its
logits as before, so ``Trainer.evaluate`` with ``compute_metrics`` is unchanged.

How, without copying any model's source: a forward pre-hook on the model takes the labels out of
the call (so transformers computes no loss); a pre-hook on its output embeddings (the LM head)
takes the hidden states the head is given, computes the loss there (while FSDP still holds the
head's weight unsharded) and hands the head an empty slice of them, so the logits are
``[B, 0, V]``; a forward hook puts the loss into the output. The loss is transformers'
``ForCausalLMLoss``: labels shifted left by one (or ``shift_labels`` as given), ``-100`` ignored,
the mean over the supervised tokens, or the sum divided by ``num_items_in_batch`` when the
``Trainer`` passes it (gradient accumulation). Where a model's labels cover only its last
positions (BLIP-2's text after the query tokens) the last hidden states are taken, as the model
itself does. Gemma 2/3's ``final_logit_softcapping`` is applied inside the op.

It applies to decoder-only language models whose output embeddings are a plain ``nn.Linear`` of
the model types in :data:`FUSED_MODEL_TYPES` (each tested against ``fused_loss=False`` in
``tests/test_fused_loss.py``); any other model keeps transformers' loss, and ``patch`` says why
once, in a warning. One difference: a batch without any supervised token gives a loss of 0 with
zero gradients, where transformers' mean gives NaN.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .call_args import ArgReader

__all__ = ["FUSED_MODEL_TYPES", "install", "why_not", "active"]

#: Model types whose training loss takes the fused path (decoder-only; BLIP-2 and InstructBLIP
#: with a decoder-only language model).
FUSED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "gpt2", "opt",
    "blip-2", "blip_2", "instructblip", "llava", "llava_next", "llava_onevision", "idefics3", "smolvlm",
    "qwen2_vl", "qwen2_5_vl", "paligemma",
})


def why_not(model: nn.Module, state: Any) -> Optional[str]:
    """Why ``model``'s training loss cannot take the fused path (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of the families the fused loss is tested on"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        return "its language model is an encoder-decoder"
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not nn.Linear:
        return f"its output embeddings are a {type(head).__name__}, not a plain nn.Linear"
    if any(layer is head for layer in state.lora_layers.values()):
        return "LoRA is on its LM head"
    return None


def active(model: nn.Module) -> bool:
    """Whether ``model`` (patched) computes its training loss through the fused path."""
    state = getattr(model, "_ptpeft", None)
    return state is not None and state.config.fused_loss and why_not(model, state) is None


def install(model: nn.Module, state: Any) -> list:
    """Hook ``model`` so its training loss is fused (see the module docstring); returns the hook
    handles (``state.hooks``), or none with one warning when the model cannot take it."""
    reason = why_not(model, state)
    if reason is not None:
        if getattr(model, "get_output_embeddings", None) is not None and model.get_output_embeddings() is not None:
            warnings.warn(f"fused_loss: {type(model).__name__} keeps transformers' loss ({reason}); the logits are "
                          "computed in training as usual", stacklevel=3)
        return []
    head = model.get_output_embeddings()
    try:
        call = ArgReader(model.forward)
    except (TypeError, ValueError):
        return []
    if not call.has("labels"):
        return []
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(text, "final_logit_softcapping", None)
    pending: dict[str, Any] = {}

    def before_model(_module, args, kwargs):
        if pending:  # a stale call that raised half-way; empty dicts stay untouched (no mutation to trace)
            pending.clear()
        if not model.training or state.disabled:
            return None
        labels = call.get(args, kwargs, "labels")
        if labels is None:
            return None
        pending.update(labels=labels, shift_labels=kwargs.get("shift_labels"),
                       num_items=kwargs.get("num_items_in_batch"))
        return call.without(args, kwargs, "labels", "shift_labels")  # only the loss reads them

    def before_head(_module, args):
        if "labels" not in pending or "loss" in pending:
            return None
        hidden = args[0]
        pending["loss"] = _loss(hidden, head, pending, softcap)
        return (hidden[..., :0, :],) + tuple(args[1:])

    def after_model(_module, args, kwargs, output):
        if "labels" not in pending:
            return None
        if "loss" not in pending:
            raise RuntimeError(f"fused_loss: {type(model).__name__}'s forward never called its output embeddings, so "
                               "no loss was computed; patch it with PTPeftConfig(fused_loss=False)")
        output.loss, output.logits = pending["loss"], None
        pending.clear()
        return output

    return [model.register_forward_pre_hook(before_model, with_kwargs=True),
            head.register_forward_pre_hook(before_head),
            model.register_forward_hook(after_model, with_kwargs=True)]


def _loss(hidden: torch.Tensor, head: nn.Linear, pending: dict, softcap: Optional[float]) -> torch.Tensor:
    """transformers' ForCausalLMLoss of ``head(hidden)`` against the pending labels, fused."""
    shift = pending["shift_labels"]
    if shift is None:
        labels = pending["labels"].to(hidden.device)
        if labels.shape[-1] > hidden.shape[-2]:
            raise ValueError(f"fused_loss: labels cover {labels.shape[-1]} positions but the LM head sees "
                             f"{hidden.shape[-2]}; pass labels aligned with input_ids")
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    else:
        shift = shift.to(hidden.device)
    hidden = hidden[..., hidden.shape[-2] - shift.shape[-1]:, :]  # the labelled (last) positions
    num_items = pending["num_items"]
    loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shift.reshape(-1),
                                    bias=head.bias, reduction="mean" if num_items is None else "sum",
                                    softcap=softcap)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss
