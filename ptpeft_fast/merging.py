"""Merge: fold LoRA into the base weights and turn prefixes into static K/V."""
from __future__ import annotations

from torch import nn

from .patch_state import get_state
from .tuners.lora import merge_lora, refuse_quantized_merge, unmerge_lora
from .tuners.prefix import GlobalPrefixMLP


def merge_prefixes(model: nn.Module) -> None:
    """Replace every prefix reparameterisation by static K/V tensors and drop the MLPs."""
    state = get_state(model)
    for prefix in state.prefix_layers.values():
        prefix.to_static()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, GlobalPrefixMLP):
                delattr(mod, name)
    if state.config.prefix is not None:
        state.config.prefix.reparam = "none"


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and make prefixes static; outputs are unchanged.

    Adapters are nonlinear and stay as they are. :func:`unmerge` undoes the LoRA fold. A model with
    LoRA on bitsandbytes 4-bit or 8-bit layers is refused before anything changes (``ValueError``
    naming :func:`ptpeft_fast.save_merged`, which writes a de-quantised merged copy).
    """
    state = get_state(model)
    for layer in state.lora_layers.values():
        refuse_quantized_merge(layer)
    for layer in state.lora_layers.values():
        merge_lora(layer)
    merge_prefixes(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the LoRA update from the base weights again (the prefix stays static)."""
    for layer in get_state(model).lora_layers.values():
        unmerge_lora(layer)
    return model
