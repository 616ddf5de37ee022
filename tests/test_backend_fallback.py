"""What a kernel cannot take: the table declines Triton for a mask it cannot reduce to key ranges,
so ``chunked`` runs it and ``explain`` says so (issue 35: the choice was made inside the op, and
``explain`` named Triton); a traced call, whose mask the table cannot read, still falls back inside
the op; an implementation asked for by name that cannot run a call says why."""
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


def _window():
    return torch.ones(5, 5, dtype=torch.bool).tril().triu(-1)  # each query sees itself and one key back


def test_the_table_declines_triton_for_a_mask_it_cannot_take_and_chunked_runs_it():
    from ptpeft_fast.ops.prefix_attention import TABLE, AttentionCall, _call

    q, k, v, pk, pv, bias = _inputs()
    for mask in (bias, _window()):
        why = ops.explain(ops.prefix_attention, q, k, v, pk, pv, causal=False, attn_mask=mask, backend="triton")
        assert why.chosen == "none" and "a mask the kernel cannot take" in why.declined["triton"], str(why)
        with pytest.raises(ops.BackendUnsupported, match="mask the kernel cannot take"):
            ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=mask, backend="triton")
    # on CUDA, auto: the same call record with a CUDA device picks chunked, naming why not triton
    call = _call(q, k, v, pk, pv, causal=False, attn_mask=_window())
    assert call.not_ranges is not None
    cuda = AttentionCall(**{**call._asdict(), "device": "cuda"})
    assert TABLE.choose("auto", cuda) == "chunked"
    ranges = AttentionCall(**{**cuda._asdict(), "not_ranges": None})  # padding: Triton takes it
    assert TABLE.choose("auto", ranges) == "triton"


def test_a_traced_call_falls_back_inside_the_op():
    """Forward and every gradient through the op with impl='triton' (what a compiled graph holds)
    equal the reference, for a general bias and a sliding window."""
    q, k, v, pk, pv, bias = _inputs()
    for mask in (bias, _window()):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        out, _ = torch.ops.ptpeft_fast.prefix_attention_forward(*leaves, m4, None, None, False, 0.25, 0.0, "triton")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, leaves, go)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
        ref_mask = mask if mask.dtype == torch.bool else mask.double()
        ref = prefix_attention_reference(*ref_leaves, causal=False, attn_mask=ref_mask, scale=0.25)
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
