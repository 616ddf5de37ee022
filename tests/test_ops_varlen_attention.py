"""Packed documents in ``ops.prefix_attention(..., cu_seqlens=...)``: every implementation against
a float64 oracle that runs each document on its own (the definition: a packed row must give each
document what it gets alone), forward and every gradient; the table's choices; bad offsets."""
from __future__ import annotations

import pytest
import torch

from ptpeft_fast import ops
from ptpeft_fast.ops import documents, prefix_attention

from triton_test_utils import DEVICE, TOL, fast_interpreter, rel_err  # noqa: F401

LENGTHS = {
    "mixed": (5, 1, 9, 0, 7),
    "one-document": (13,),
    "singletons": (1, 1, 1, 1),
    # documents across block edges of every Triton tile size (16..128 rows/keys)
    "long": (40, 3, 70, 1, 33),
}
IMPLS = ["torch", "chunked", "block_cpp", "lse_merge", "triton"]


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, *, H=4, Hkv=2, D=16, P=3, shared=True, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ps = (Hkv, P, D) if shared else (1, Hkv, P, D)
    shapes = [(1, H, T, D), (1, Hkv, T, D), (1, Hkv, T, D), ps, ps]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _separately(q, k, v, pk, pv, cu: torch.Tensor):
    """float64: each document alone through the reference (causal, no mask), concatenated."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, pk, pv)]
    outs = [prefix_attention(leaves[0][:, :, s:e], leaves[1][:, :, s:e], leaves[2][:, :, s:e], leaves[3], leaves[4],
                             causal=True, backend="torch")
            for s, e in documents.spans(cu)]
    return torch.cat(outs, dim=2), leaves


def _check(impl, lengths, *, dtype=torch.float32, tol=None, device="cpu", **kw):
    q, k, v, pk, pv = _inputs(lengths, dtype=dtype, device=device, **kw)
    cu = _offsets(lengths).to(device)
    out = prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, backend=impl)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), go)
    ref, leaves = _separately(q, k, v, pk, pv, cu.cpu())
    ref_grads = torch.autograd.grad(ref, leaves, go.double().cpu())
    tol = tol or TOL[dtype]
    assert rel_err(out.cpu(), ref) <= tol, f"{impl}: output"
    for name, a, b in zip("q k v prefix_k prefix_v".split(), grads, ref_grads, strict=True):
        assert rel_err(a.cpu(), b) <= tol, f"{impl}: d{name}"


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "per-row-prefix"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton"])
def test_each_cpu_implementation_equals_documents_alone(impl, lengths, shared):
    if impl == "block_cpp" and not shared:
        pytest.skip("block_cpp takes a batch-shared prefix only")
    _check(impl, lengths, shared=shared)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("P", [1, 5])
@pytest.mark.parametrize("impl", ["chunked", "block_cpp", "lse_merge"])
def test_gqa_mqa_and_prefix_lengths(impl, H, Hkv, P):
    _check(impl, LENGTHS["mixed"], H=H, Hkv=Hkv, P=P)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "per-row-prefix"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_triton_equals_documents_alone(lengths, shared, fast_interpreter):  # noqa: F811
    pytest.importorskip("triton")
    _check("triton", lengths, shared=shared, H=4, Hkv=2, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, fast_interpreter):  # noqa: F811
    pytest.importorskip("triton")
    _check("triton", LENGTHS["long"], dtype=dtype, device=DEVICE, H=4, Hkv=1)


def test_triton_declines_documents_with_dropout():
    """That branch spilled registers (tools/compile_matrix.py): chunked runs it, and says why."""
    q, k, v, pk, pv = (t.detach() for t in _inputs(LENGTHS["mixed"]))
    ex = ops.explain(prefix_attention, q, k, v, pk, pv, causal=True, cu_seqlens=_offsets(LENGTHS["mixed"]),
                     dropout_p=0.1)
    assert "attention dropout" in ex.declined["triton"]


def test_half_precision_cpu_and_float64_gradcheck():
    _check("lse_merge", LENGTHS["mixed"], dtype=torch.bfloat16)
    q, k, v, pk, pv = (t.detach().double().requires_grad_() for t in _inputs((3, 1, 4), H=2, Hkv=1, D=4, P=2))
    cu = _offsets((3, 1, 4))
    for impl in ("chunked", "lse_merge"):
        assert torch.autograd.gradcheck(
            lambda *a, impl=impl: prefix_attention(*a, causal=True, cu_seqlens=cu, backend=impl), (q, k, v, pk, pv))


def test_dropout_is_per_document_and_seeded():
    """Dropout on CPU runs chunked once per document, with a stream of its own per document."""
    q, k, v, pk, pv = _inputs(LENGTHS["mixed"])
    cu = _offsets(LENGTHS["mixed"])
    torch.manual_seed(3)
    a = prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, dropout_p=0.3)
    torch.manual_seed(3)
    b = prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, dropout_p=0.3)
    assert torch.equal(a, b)
    plain = prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu)
    assert not torch.allclose(a, plain)
    assert ops.explain(prefix_attention, q, k, v, pk, pv, causal=True, cu_seqlens=cu, dropout_p=0.3).chosen == \
        "chunked"
    a.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, pk, pv))


def test_table_never_picks_a_dense_path_for_documents():
    q, k, v, pk, pv = _inputs(LENGTHS["long"])
    cu = _offsets(LENGTHS["long"])
    ex = ops.explain(prefix_attention, q, k, v, pk, pv, causal=True, cu_seqlens=cu)
    assert ex.chosen == "block_cpp"
    short = [t.detach() for t in _inputs((3, 1, 4))]  # 8 queries: what decode_cpp would take
    assert "packed documents" in ops.explain(prefix_attention, *short, causal=True,
                                             cu_seqlens=_offsets((3, 1, 4))).declined["decode_cpp"]
    half = [t.detach().bfloat16() for t in (q, k, v, pk, pv)]
    assert ops.explain(prefix_attention, *half, causal=True, cu_seqlens=cu).chosen == "lse_merge"
    # the reference only when asked for by name
    assert "dense" in ops.explain(prefix_attention, *half, causal=True, cu_seqlens=cu).declined["torch"]
    # block_cpp's key limit counts the longest document, not the row
    long_doc = (2000, 10)
    q2, k2, v2, pk2, pv2 = _inputs(long_doc, H=1, Hkv=1, D=4, P=2)
    assert ops.explain(prefix_attention, q2, k2, v2, pk2, pv2, causal=True, cu_seqlens=_offsets(long_doc),
                       max_seqlen=2000).chosen == "lse_merge"


def test_work_is_per_document_not_the_whole_row(monkeypatch):
    """lse_merge runs once per document on that document's tokens only; block_cpp hands the
    offsets to its C++ loop in one call (its blocks are per document: benchmarks' varlen_attention)."""
    import sys

    pa_mod = sys.modules["ptpeft_fast.ops.prefix_attention"]  # the module (the package exports the function)
    seen = {"lse_merge": [], "block_cpp": []}
    real_lse, real_block = pa_mod.lse_merge_forward, pa_mod.block_forward

    def lse_spy(q, *a, **kw):
        seen["lse_merge"].append(q.shape[2])
        return real_lse(q, *a, **kw)

    def block_spy(q, *a, **kw):
        seen["block_cpp"].append((q.shape[2], a[-1] is not None))
        return real_block(q, *a, **kw)

    monkeypatch.setattr(pa_mod, "lse_merge_forward", lse_spy)
    monkeypatch.setattr(pa_mod, "block_forward", block_spy)
    q, k, v, pk, pv = _inputs(LENGTHS["mixed"])
    cu = _offsets(LENGTHS["mixed"])
    prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, backend="lse_merge")
    prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, backend="block_cpp")
    assert seen["lse_merge"] == [n for n in LENGTHS["mixed"] if n]
    assert seen["block_cpp"] == [(sum(LENGTHS["mixed"]), True)]


def test_fullgraph_compile_and_opcheck():
    q, k, v, pk, pv = _inputs(LENGTHS["mixed"])
    cu = _offsets(LENGTHS["mixed"])

    def f(q, k, v, pk, pv, cu):
        return prefix_attention(q, k, v, pk, pv, causal=True, cu_seqlens=cu, max_seqlen=9, backend="lse_merge")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, pk, pv, cu)
    assert rel_err(out, f(q, k, v, pk, pv, cu)) <= 1e-6
    args = (q, k, v, pk, pv, None, cu, None, True, 0.25, 0.0, "lse_merge")
    torch.library.opcheck(torch.ops.ptpeft_fast.prefix_attention_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_document_mask_and_bounds():
    cu = _offsets((2, 0, 3))
    lo, hi = documents.token_bounds(cu, 5)
    assert lo.tolist() == [0, 0, 2, 2, 2] and hi.tolist() == [2, 2, 5, 5, 5]
    m = documents.document_mask(cu, 5)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("change,message", [
    (dict(cu=torch.tensor([0, 3, 5])), "cu_seqlens [0, 3, 5] must rise from 0 to the 13"),
    (dict(cu=torch.tensor([0, 9, 4, 13], dtype=torch.int32)), "never falling"),
    (dict(cu=torch.tensor([[0, 13]], dtype=torch.int32)), "1-D int32 tensor"),
    (dict(cu=torch.tensor([0.0, 13.0])), "1-D int32 tensor"),
    (dict(causal=False), "causal=False"),
    (dict(mask=True), "attn_mask is given too"),
    (dict(batch=2), "q has batch 2"),
    (dict(max_seqlen=2.5), "max_seqlen must be a Python int"),
])
def test_bad_offsets_name_the_problem(change, message):
    lengths = (5, 8)
    q, k, v, pk, pv = _inputs(lengths)
    if change.get("batch"):
        q, k, v = (t.detach().expand(2, -1, -1, -1) for t in (q, k, v))
    cu = change.get("cu", _offsets(lengths))
    mask = torch.ones(13, 13, dtype=torch.bool) if change.get("mask") else None
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prefix_attention(q, k, v, pk, pv, causal=change.get("causal", True), attn_mask=mask, cu_seqlens=cu,
                         max_seqlen=change.get("max_seqlen"))


def test_offsets_are_read_once_for_the_layers_of_a_forward(monkeypatch):
    """The same offsets tensor, as every layer of a forward gets it, is read on the host once; a
    changed tensor (new values, new object) is checked again."""
    cu = _offsets((5, 8))
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t is cu) or real(t))
    for _ in range(3):
        documents.check_offsets(cu, 13, cu.device)
    assert reads.count(True) == 1
    cu[1] = 9  # in place: its version changes, so it is checked again
    documents.check_offsets(cu, 13, cu.device)
    assert reads.count(True) == 2
    with pytest.raises(ValueError, match="must rise from 0"):
        documents.check_offsets(torch.tensor([0, 9, 12], dtype=torch.int32), 13, cu.device)
