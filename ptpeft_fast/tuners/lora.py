"""LoRA on existing linear layers, without renaming their parameters.

The target layer's class is swapped for a subclass whose forward runs the fused
``ops.lora_linear``; the LoRA factors live in a child module named ``lora_<component>``,
so the base weights keep their names (plain Hugging Face checkpoints still load) and
the LoRA parameter names carry their group and component.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..config import lora_scaling
from ..quantized import quantized_base


class LoraWeights(nn.Module):
    """A ``[r, in]``, B ``[out, r]`` (B starts at zero: identity at init), plus scaling."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 dtype: torch.dtype, device=None) -> None:
        super().__init__()
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.r, self.scaling, self.dropout_p = r, lora_scaling(alpha, r), dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT does
        self.merged = False
        self.enabled = True  # False inside ptpeft_fast.disabled(model)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout_p}, merged={self.merged}"

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, shaped like an ``nn.Linear`` weight ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scaling


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (transformers' ``Conv1D`` stores ``[in, out]``)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" or any(c.__name__ == "Conv1D" for c in type(layer).__mro__)


def features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer (a quantized one's from its attributes: its
    weight is packed storage)."""
    if quantized_base(layer) is not None:
        return layer.in_features, layer.out_features
    w = linear_weight(layer)
    return w.shape[1], w.shape[0]


# Linear layers whose weight is stored quantized or packed: the fused op would read the storage as
# a dense [out, in] matrix. Known by class name, so none of these packages is imported here.
_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "Params4bit", "Int8Params",
                      "HQQLinear", "QuantLinear", "WQLinear", "QLinear", "FP8Linear", "MarlinLinear",
                      "AffineQuantizedTensor", "LinearActivationQuantizedTensor", "Float8Tensor")
SUPPORTED_LINEAR = ("torch.nn.Linear and transformers' Conv1D with a dense floating-point weight, and bitsandbytes "
                    "Linear4bit (NF4/FP4) and Linear8bitLt layers (QLoRA); a base quantized with torchao, HQQ, GPTQ "
                    "or AWQ is not supported: load it in bitsandbytes 4-bit or 8-bit, or in float32, float16 or "
                    "bfloat16 (the prefix and adapters work on any quantized model)")


def unsupported_linear(layer: nn.Module) -> str | None:
    """Why LoRA cannot wrap ``layer`` (a quantized or packed linear type, or a weight that is not
    the dense ``[out, in]`` matrix its features say), or None when it can."""
    if quantized_base(layer) is not None:
        return None  # its own forward computes the base product; LoRA adds its term (lora_branch)
    names = [c.__name__ for c in type(layer).__mro__]
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        names += [c.__name__ for c in type(weight).__mro__]
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        names += [c.__name__ for c in type(data).__mro__]
    hit = next((n for n in names if n in _QUANTIZED_CLASSES), None)
    if hit is not None:
        return f"a quantized layer ({type(layer).__module__}.{type(layer).__name__}, storage {hit})"
    if not isinstance(weight, torch.Tensor):
        return f"{type(layer).__name__} has no weight tensor"
    if not weight.is_floating_point():
        return f"its weight is stored as {weight.dtype} (packed or quantized)"
    fin, fout = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if not is_conv1d(layer) and fin is not None and fout is not None and tuple(weight.shape) != (fout, fin):
        return (f"its weight is {list(weight.shape)} but the layer has in_features={fin}, out_features={fout} "
                "(packed or quantized storage)")
    return None


class _LoraForward:
    """Mixin whose forward adds the LoRA term through the fused op."""

    _ptpeft_lora: str
    _ptpeft_backend: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        lora: LoraWeights = getattr(self, self._ptpeft_lora)
        weight = linear_weight(self)
        if lora.merged or not lora.enabled:  # merged: W holds the delta; disabled: the base layer alone
            return nn.functional.linear(x, weight, self.bias)
        a, b = lora.lora_A.to(x.dtype), lora.lora_B.to(x.dtype)
        return ops.lora_linear(x, weight, self.bias, a, b, lora.scaling,
                               dropout_p=lora.dropout_p if self.training else 0.0, backend=self._ptpeft_backend)


class _QuantizedLoraForward:
    """Mixin for a bitsandbytes layer: its own forward (its kernels, its dequantisation and its
    backward for the input), then the LoRA term through :func:`ptpeft_fast.ops.lora_branch`."""

    _ptpeft_lora: str
    _ptpeft_backend: str
    _ptpeft_base_class: type

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        base = self._ptpeft_base_class.forward(self, x, *args, **kwargs)
        lora: LoraWeights = getattr(self, self._ptpeft_lora)
        if not lora.enabled:
            return base
        xb = x.to(base.dtype)
        return ops.lora_branch(base, xb, lora.lora_A.to(base.dtype), lora.lora_B.to(base.dtype), lora.scaling,
                               dropout_p=lora.dropout_p if self.training else 0.0, backend=self._ptpeft_backend)


_CLASSES: dict[type, type] = {}


def attach_lora(layer: nn.Module, name: str, lora: LoraWeights, backend: str) -> None:
    """Give ``layer`` the LoRA factors ``lora`` as child ``name`` and route its forward through them."""
    if hasattr(layer, "_ptpeft_lora"):
        raise ValueError(f"{type(layer).__name__} already has LoRA ({layer._ptpeft_lora}); a layer takes one LoRA")
    base = type(layer)
    if base not in _CLASSES:
        mixin = _QuantizedLoraForward if quantized_base(layer) is not None else _LoraForward
        _CLASSES[base] = type(f"Lora{base.__name__}", (mixin, base), {"_ptpeft_base_class": base})
    layer.add_module(name, lora)
    layer._ptpeft_lora = name
    layer._ptpeft_backend = backend
    layer.__class__ = _CLASSES[base]


def lora_of(layer: nn.Module) -> LoraWeights | None:
    name = getattr(layer, "_ptpeft_lora", None)
    return getattr(layer, name) if name else None


def refuse_quantized_merge(layer: nn.Module) -> None:
    """``ValueError`` when ``layer`` is a quantized layer (merging would re-quantise its weight)."""
    kind = quantized_base(layer)
    if kind is not None:
        raise ValueError(f"merge: LoRA on a {kind} layer cannot be merged: folding B·A into the quantized weight "
                         "would re-quantise it and change the outputs. Keep the LoRA apart (the model runs "
                         "unmerged), or write a full-precision merged copy with ptpeft_fast.save_merged(model, dir), "
                         "which de-quantises the base weights first")


@torch.no_grad()
def merge_lora(layer: nn.Module) -> None:
    """Fold scaling·B·A into the base weight (idempotent)."""
    lora = lora_of(layer)
    if lora is None or lora.merged:
        return
    refuse_quantized_merge(layer)
    delta = lora.delta_weight().to(layer.weight.dtype)
    layer.weight.add_(delta.t() if is_conv1d(layer) else delta)
    lora.merged = True


@torch.no_grad()
def unmerge_lora(layer: nn.Module) -> None:
    """Undo :func:`merge_lora` (idempotent)."""
    lora = lora_of(layer)
    if lora is None or not lora.merged:
        return
    delta = lora.delta_weight().to(layer.weight.dtype)
    layer.weight.sub_(delta.t() if is_conv1d(layer) else delta)
    lora.merged = False
