"""ops.linear_cross_entropy against the float64 reference: every implementation, the loss and the
gradients of hidden, weight and bias, every reduction, ignored tokens in every chunk and all of
them, a vocabulary that is not a multiple of the chunk (and the vocabulary-chunk path), softcap,
bias, bf16, a trainable and a frozen head; the op's registration (opcheck, torch.compile)."""
from __future__ import annotations

import importlib

import pytest
import torch

from ptpeft_fast import ops
from ptpeft_fast.ops.linear_cross_entropy import linear_cross_entropy

# the module (the package attribute of that name is the op itself)
lce_module = importlib.import_module("ptpeft_fast.ops.linear_cross_entropy")

IMPLS = ["chunked", "triton", "torch"]


def _reference(h, w, y, b, reduction, softcap, ignore_index=-100):
    """Float64 oracle, written apart from the package's: log-softmax and a gather."""
    z = h.double() @ w.double().t() + (0 if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = y != ignore_index
    nll = -(z.log_softmax(-1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)) * keep
    if reduction == "none":
        return nll
    total = nll.sum()
    return total / keep.sum().clamp_min(1) if reduction == "mean" else total


def _case(N=29, H=12, V=53, dtype=torch.float32, bias=False, head_grad=False, seed=0, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(head_grad)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(head_grad) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore == "some":
        y[::3] = -100
    elif ignore == "all":
        y[:] = -100
    return h, w, b, y


def _check(impl, h, w, b, y, reduction, softcap, tol):
    out = linear_cross_entropy(h, w, y, bias=b, reduction=reduction, softcap=softcap, backend=impl)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, go) if out.requires_grad else [torch.zeros_like(t) for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    by_id = {id(t): r for t, r in zip(leaves, ref_leaves, strict=True)}
    rh, rw = by_id.get(id(h), h.detach().double()), by_id.get(id(w), w.detach().double())
    rb = None if b is None else by_id.get(id(b), b.detach().double())
    ref = _reference(rh, rw, y, rb, reduction, softcap)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double(), allow_unused=True)
    err = float((out.detach().double() - ref.detach()).abs().max())
    assert err <= tol * max(1.0, float(ref.detach().abs().max())), (impl, reduction, err)
    for a, r in zip(grads, ref_grads, strict=True):
        r = torch.zeros_like(a, dtype=torch.float64) if r is None else r
        scale = max(float(r.norm()), 1e-12)
        assert float((a.double() - r).norm()) / scale <= tol, (impl, reduction, a.shape)


@pytest.fixture(params=[4 * 53 * 16, 4 * 16 * 40], ids=["row-chunks", "vocab-chunks"])
def budget(request, monkeypatch):
    """Small budgets for V = 53, at least 16 rows a chunk: 16-row chunks with the whole vocabulary,
    or 16 rows by 40 columns (the online log-sum-exp over vocabulary chunks of 40 and 13)."""
    monkeypatch.setattr(lce_module, "LOGITS_CHUNK_BYTES", request.param)
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(lce_module, "MAX_CHUNK_FACTOR", 1)
    return request.param


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("bias,head_grad", [(False, False), (True, True), (False, True)])
def test_matches_the_float64_reference(impl, reduction, softcap, bias, head_grad, budget):
    h, w, b, y = _case(bias=bias, head_grad=head_grad, seed=hash((reduction, softcap, bias)) % 1000)
    _check(impl, h, w, b, y, reduction, softcap, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_supervised_token_gives_zero_loss_and_zero_gradients(impl):
    h, w, b, y = _case(ignore="all", head_grad=True)
    out = linear_cross_entropy(h, w, y, backend=impl)
    assert float(out) == 0.0
    gh, gw = torch.autograd.grad(out, [h, w])
    assert not gh.any() and not gw.any()
    assert not linear_cross_entropy(h, w, y, reduction="none", backend=impl).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_accumulate_in_fp32(impl):
    h, w, b, y = _case(N=40, H=32, V=301, dtype=torch.bfloat16, bias=True, head_grad=True)
    out = linear_cross_entropy(h, w, y, bias=b, backend=impl)
    assert out.dtype == torch.float32
    _check(impl, h, w, b, y, "mean", None, 2e-2)  # bf16 inputs and gradients: their own rounding


def test_float64_is_exact_on_every_path(monkeypatch):
    monkeypatch.setattr(lce_module, "LOGITS_CHUNK_BYTES", 8 * 20 * 16)
    monkeypatch.setattr(lce_module, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(lce_module, "MAX_CHUNK_FACTOR", 1)
    h, w, b, y = _case(dtype=torch.float64, bias=True, head_grad=True)
    for impl in ("chunked", "torch"):
        _check(impl, h, w, b, y, "mean", 3.0, 1e-12)


def test_a_frozen_head_gets_no_gradient_buffer(monkeypatch):
    seen = []
    real = lce_module.chunked_loss_and_grads

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out[2].numel())
        return out

    monkeypatch.setattr(lce_module, "chunked_loss_and_grads", spy)
    h, w, b, y = _case(head_grad=False)
    linear_cross_entropy(h, w, y, backend="chunked").backward()
    assert seen == [0] and h.grad is not None and w.grad is None


def test_auto_picks_chunked_on_cpu_and_explains():
    h, w, b, y = _case()
    why = ops.explain(ops.linear_cross_entropy, h, w, y)
    assert why.chosen == "chunked" and "cuda" in why.declined["triton"].lower(), str(why)


def test_opcheck_and_fullgraph_compile():
    h, w, b, y = _case(N=9, H=8, V=17, bias=True, head_grad=True)
    need = [True, True, True]
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.ptpeft_fast.linear_cross_entropy_forward.default,
                              (h, w, b, y, -100, None, reduction, "chunked", need))

    def loss_fn(h, w, b, y):
        return ops.linear_cross_entropy(h, w, y, bias=b, softcap=2.0)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    a = compiled(h, w, b, y)
    ga = torch.autograd.grad(a, [h, w, b])
    e = loss_fn(h, w, b, y)
    ge = torch.autograd.grad(e, [h, w, b])
    assert torch.allclose(a, e) and all(torch.allclose(x, z) for x, z in zip(ga, ge, strict=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must be integer \[N\]"),
    (dict(reduction="avg"), "reduction='avg'"),
    (dict(softcap=0.0), "softcap must be a positive finite number"),
    (dict(hidden=torch.randn(2, 4, 8)), r"hidden must be a floating \[N, H\]"),
    (dict(weight=torch.randn(10, 7)), r"weight must be \[V, H\]"),
])
def test_bad_input_names_the_problem(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_chunk_sizes_keep_the_gemms_wide_and_the_memory_bounded():
    assert lce_module._chunk_sizes(8192, 49152) == (170, 49152)  # 32 MiB of logits
    assert lce_module._chunk_sizes(8192, 262144) == (128, 262144)  # 128 rows: 128 MiB (within 8 budgets)
    rows, cols = lce_module._chunk_sizes(8192, 4 << 20)  # a 4M vocabulary: split
    assert rows == 128 and cols * rows * 4 <= 8 * lce_module.LOGITS_CHUNK_BYTES
