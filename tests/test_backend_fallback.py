"""Automatic dispatch falls back to the torch path when a kernel refuses its arguments;
a backend asked for by name reports the refusal."""
import pytest
import torch

import importlib

from ptpeft_fast import ops
from ptpeft_fast.ops import _backend

pa_module = importlib.import_module("ptpeft_fast.ops.prefix_attention")  # the module, not the function

pytest.importorskip("triton")


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 2, 5, 16, generator=g)
    v = torch.randn(2, 2, 5, 16, generator=g)
    pk = torch.randn(2, 3, 16, generator=g)
    pv = torch.randn(2, 3, 16, generator=g)
    bias = torch.randn(1, 4, 5, 5, generator=g)  # a general float bias (T5's position bias): Triton refuses it
    return q, k, v, pk, pv, bias


def test_auto_falls_back_when_the_kernel_refuses(monkeypatch):
    q, k, v, pk, pv, bias = _inputs()
    ref = ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias, backend="torch")
    # make "auto" pick Triton on these CPU tensors, as it does for CUDA tensors
    real = _backend.resolve_backend
    monkeypatch.setattr(pa_module, "resolve_backend",
                        lambda op, req, *t, **kw: "triton" if req == "auto" else real(op, req, *t, **kw))
    out = ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias, backend="auto")
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias, backend="triton")
    with ops.use_backend("triton"), pytest.raises(ValueError):
        ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias)


def test_try_kernel_contract():
    def refuse():
        raise _backend.BackendUnsupported("no")

    assert _backend.try_kernel("auto", refuse) is None
    assert _backend.try_kernel("auto", lambda: 3) == 3
    with pytest.raises(_backend.BackendUnsupported):
        _backend.try_kernel("triton", refuse)
    with ops.use_backend("triton"), pytest.raises(_backend.BackendUnsupported):
        _backend.try_kernel("auto", refuse)
