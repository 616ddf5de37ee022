"""``disabled(model)``: run a patched model as the unpatched one (zero-shot baselines, FSDP)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .patch_state import get_state


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Bypass every prefix, LoRA and adapter of a patched model inside the ``with`` block.

    The model then computes what the unpatched model computes (positions included: the
    position hooks of ``patch`` are off too), without removing anything, so parameters,
    optimizer state and sharding (FSDP) stay as they are. Merged LoRA weights live in the
    base weight and cannot be bypassed: call :func:`ptpeft_fast.unmerge` first.
    """
    state = get_state(model)
    merged = [path for path, layer in state.lora_layers.items() if getattr(layer, layer._ptpeft_lora).merged]
    if merged:
        raise ValueError(f"disabled(): LoRA is merged into {merged[0]} (and {len(merged) - 1} more); "
                         "call ptpeft_fast.unmerge(model) first")
    if state.disabled:  # nested: the outer block restores
        yield model
        return
    modules = [*state.prefix_layers.values(), *(getattr(lin, lin._ptpeft_lora) for lin in state.lora_layers.values()),
               *state.adapters.values()]
    state.disabled = True
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True
        state.disabled = False
