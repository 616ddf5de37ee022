"""LoRA on a quantized or packed linear layer it does not support is refused at ``patch``, naming the
layer, its type and what is supported (issue 34 item 3): before, such a layer was accepted and the
first forward failed with a raw shape error. The layers here imitate GPTQ/AWQ-, HQQ- and
bitsandbytes-like classes and storage; a ``Linear4bit`` that is not bitsandbytes' own is refused too.
bitsandbytes' real ``Linear4bit`` and ``Linear8bitLt`` are supported (``tests/test_qlora.py``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptpeft_fast as pf

from _tiny_models import load


class Params4bit(nn.Parameter):
    """bitsandbytes' packed 4-bit storage: uint8 [out·in/2, 1]."""


class Linear4bit(nn.Linear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed = torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8)
        self.weight = Params4bit(packed, requires_grad=False)


class QuantLinear(nn.Module):
    """GPTQ/AWQ-style: packed int32 weights in buffers, no nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.in_features // 8, linear.out_features, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class HQQLinear(nn.Module):
    """HQQ-style: no nn.Linear, a packed uint8 weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.W_q = nn.Parameter(torch.zeros(linear.in_features * linear.out_features // 2, dtype=torch.uint8),
                                requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class SquashedLinear(nn.Linear):
    """A float weight whose shape does not match the layer's features."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros(linear.out_features * linear.in_features // 4, 4))


def _with(kind):
    model = copy.deepcopy(load("llama"))
    attn = model.model.layers[0].self_attn
    attn.q_proj = kind(attn.q_proj)
    return model


@pytest.mark.parametrize("kind,says", [(Linear4bit, "Linear4bit"), (QuantLinear, "QuantLinear"),
                                       (HQQLinear, "HQQLinear"),
                                       (SquashedLinear, "in_features=64, out_features=64")])
def test_lora_on_a_quantized_layer_is_refused_at_patch(kind, says):
    model = _with(kind)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj cannot take LoRA") as e:
        pf.patch(model, {"lora": {"r": 4, "targets": ["q_proj", "v_proj"]}})
    assert says in str(e.value) and "Supported: torch.nn.Linear" in str(e.value)
    assert not hasattr(model, "_ptpeft")  # nothing half-patched


def test_prefix_and_adapters_still_patch_a_model_with_quantized_layers():
    model = _with(Linear4bit)
    pf.patch(model, {"prefix": {"num_tokens": 2}, "lora": None, "adapter": {"bottleneck": 4}})
    assert pf.trainable_parameters(model)["prefix"] > 0
