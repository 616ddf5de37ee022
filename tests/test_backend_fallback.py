"""What a kernel cannot take: the Triton op runs its chunked path inside the same op for a mask it
cannot reduce to key ranges (so ``auto`` never fails on CUDA for a valid mask); an implementation
asked for by name that cannot run a call says why."""
import pytest
import torch
from _oracles import prefix_attention_reference

from ptpeft_fast import ops

pytest.importorskip("triton")


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 2, 5, 16, generator=g)
    v = torch.randn(2, 2, 5, 16, generator=g)
    pk = torch.randn(2, 3, 16, generator=g)
    pv = torch.randn(2, 3, 16, generator=g)
    bias = torch.randn(1, 4, 5, 5, generator=g)  # a general float bias (T5's position bias): no key ranges
    return q, k, v, pk, pv, bias


def test_triton_runs_chunked_inside_the_op_for_a_mask_it_cannot_take():
    """Forward and every gradient through the Triton op equal the reference, for a general bias and
    for a sliding window (the kernel only takes padding and bottom-right causality)."""
    q, k, v, pk, pv, bias = _inputs()
    window = torch.ones(5, 5, dtype=torch.bool).tril().triu(-1)  # each query sees itself and one key back
    for mask in (bias, window):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
        out = ops.prefix_attention(*leaves, causal=False, attn_mask=mask, backend="triton")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, leaves, go)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
        ref_mask = mask if mask.dtype == torch.bool else mask.double()
        ref = prefix_attention_reference(*ref_leaves, causal=False, attn_mask=ref_mask)
        ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
        assert ((out.double() - ref).norm() / ref.norm()) <= 1e-5
        for a, b in zip(grads, ref_grads, strict=True):
            assert ((a.double() - b).norm() / b.norm()) <= 1e-5


def test_named_backend_that_cannot_run_says_why():
    q, k, v, pk, pv, bias = _inputs()
    with pytest.raises(ops.BackendUnsupported, match="triton.*mask requires grad"):
        ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias.requires_grad_(), backend="triton")
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnsupported, match="float64"):
        ops.prefix_attention(*(t.double() for t in (q, k, v, pk, pv)), causal=True)
    with pytest.raises(ops.BackendUnsupported, match="decode_cpp.*autograd"):
        ops.prefix_attention(q.requires_grad_(), k, v, pk, pv, causal=True, backend="decode_cpp")
