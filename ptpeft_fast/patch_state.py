"""What ``patch`` did to a model, kept as ``model._ptpeft``: read by patching, stages, merging,
checkpoints and interop (its own module, below all of them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PTPeftConfig
from .tuners.adapter import BottleneckAdapter
from .tuners.prefix import LayerPrefix

__all__ = ["GROUPS", "PatchState", "get_state"]

GROUPS = ("prefix", "lora", "adapter", "extra", "base")


@dataclass
class PatchState:
    """What ``patch`` did to a model (kept as ``model._ptpeft``)."""

    config: PTPeftConfig
    prefix_layers: dict[str, LayerPrefix] = field(default_factory=dict)  # attention path -> prefix
    lora_layers: dict[str, nn.Module] = field(default_factory=dict)  # linear path -> patched layer
    adapters: dict[str, BottleneckAdapter] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    extra_trainable: list[str] = field(default_factory=list)  # e.g. a task head that trains in every stage
    previous_attn_implementation: Any = None
    packing_root: nn.Module | None = None  # the language model whose forward recognises packed rows
    stage: str | None = None
    stage_version: int = 0  # +1 at every set_stage: the optimizer guard checks once per version
    disabled: bool = False  # inside ptpeft_fast.disabled(model): every PT-PEFT module is bypassed


def get_state(model: nn.Module) -> PatchState:
    """The model's :class:`PatchState`; ``ValueError`` if ``patch`` was not called."""
    state = getattr(model, "_ptpeft", None)
    if state is None:
        raise ValueError("this model is not patched: call ptpeft_fast.patch(model, config) first")
    return state
