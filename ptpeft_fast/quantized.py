"""The quantized linear layers LoRA supports (bitsandbytes ``Linear4bit`` and ``Linear8bitLt``):
recognising them, their dense weight, and their entries in a state dict.

Recognised by class name and package, so nothing here imports bitsandbytes until a weight is
de-quantised.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BNB_LAYERS", "QUANTIZE", "INSTALL", "bnb_config", "quantized_base", "keep_differentiable",
           "upcast_unquantized", "dequantized_weight", "densify_state_dict"]

#: ``model.quantize`` values -> ``BitsAndBytesConfig`` arguments
QUANTIZE = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
            "int8": {"load_in_8bit": True}}
INSTALL = "pip install -e '.[quant]' (or pip install bitsandbytes)"


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of ``model.quantize: kind`` (4-bit computes in ``compute_dtype``);
    ``ModuleNotFoundError`` naming the install command when bitsandbytes is missing."""
    if kind not in QUANTIZE:
        raise ValueError(f"quantize={kind!r}: choose one of {sorted(QUANTIZE)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(f"model.quantize={kind} loads the base with bitsandbytes, which is not installed: "
                          f"{INSTALL}") from None
    from transformers import BitsAndBytesConfig
    extra = {"bnb_4bit_compute_dtype": compute_dtype} if QUANTIZE[kind].get("load_in_4bit") else {}
    return BitsAndBytesConfig(**QUANTIZE[kind], **extra)


def upcast_unquantized(model: nn.Module) -> int:
    """Cast every floating-point parameter that is not quantized storage (norms, embeddings, the LM
    head) to float32, as PEFT's ``prepare_model_for_kbit_training`` does: with a half-precision
    base those are what QLoRA keeps in full precision. Returns how many were cast."""
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            n += 1
    return n

#: bitsandbytes layer class -> what the messages call it
BNB_LAYERS = {"Linear4bit": "bitsandbytes 4-bit (NF4/FP4)", "Linear8bitLt": "bitsandbytes 8-bit (LLM.int8)"}


def quantized_base(layer: nn.Module) -> str | None:
    """What kind of supported quantized layer ``layer`` is, else None."""
    for c in type(layer).__mro__:
        if c.__name__ in BNB_LAYERS and c.__module__.startswith("bitsandbytes"):
            return BNB_LAYERS[c.__name__]
    return None


def _is_4bit(layer: nn.Module) -> bool:
    return quantized_base(layer) == BNB_LAYERS["Linear4bit"]


def _unpack_cpu_layout(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference layout of a 4-bit weight (see :func:`keep_differentiable`)."""
    w = layer.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        layer.quant_state = w.quant_state


def keep_differentiable(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its differentiable path; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks a 4-bit weight the first time the layer
    runs in eval mode without gradients, and from then on multiplies through ``gemv_4bit``: in
    bfloat16 whatever the compute dtype, and with no autograd formula, so the gradient reaching
    the input is silently lost in training. A patched model trains and evaluates, so the repacking
    is turned off (``support_avx512bf16_for_cpu = False``) and undone where it already happened:
    the layers then de-quantise and multiply in their compute dtype on every host.
    """
    n = 0
    for layer in model.modules():
        if _is_4bit(layer):
            layer.support_avx512bf16_for_cpu = False
            _unpack_cpu_layout(layer)
            n += 1
    return n


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float32 weight a bitsandbytes layer multiplies by: what its forward computes
    with (NF4/FP4 codes times their block scales; int8 rows times their scale / 127)."""
    kind = quantized_base(layer)
    if kind is None:
        raise ValueError(f"dequantized_weight: {type(layer).__name__} is not a bitsandbytes 4-bit or 8-bit layer")
    w = layer.weight
    if _is_4bit(layer):
        import bitsandbytes.functional as bnbf
        _unpack_cpu_layout(layer)
        return bnbf.dequantize_4bit(w.data, w.quant_state).float().reshape(layer.out_features, layer.in_features)
    cb = getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if cb is None or scb is None:  # not yet quantized (an Int8Params still holding floats)
        return w.data.float()
    return cb.float() * scb.float().unsqueeze(1) / 127.0


def densify_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """In ``sd`` (``model``'s state dict), replace every bitsandbytes layer's packed weight and its
    quantisation state with the dense ``weight`` in ``dtype``; returns the layers' paths."""
    paths = []
    for path, layer in model.named_modules():
        if quantized_base(layer) is None:
            continue
        key = f"{path}.weight"
        for k in [k for k in sd if k.startswith(key + ".") or k in (f"{path}.SCB", f"{path}.weight_format")]:
            del sd[k]
        sd[key] = dequantized_weight(layer).to(dtype)
        paths.append(path)
    return paths
