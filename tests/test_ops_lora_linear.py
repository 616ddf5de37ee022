"""lora_linear: every CPU implementation of its dispatch table (merged_cpp, merged, separate and the
torch reference), chosen through the public switch, against the float64 reference (design §5)."""
from __future__ import annotations

import pytest
import torch
from _oracles import lora_linear_reference

from ptpeft_fast.ops import explain, lora_linear, use_backend

CPU_IMPLS = ("merged_cpp", "merged", "separate", "torch")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    return ((out - ref).norm() / ref.norm()).item()


def _inputs(lead, d_in, d_out, r, *, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    return dict(
        x=rnd(*lead, d_in),
        weight=rnd(d_out, d_in, s=d_in**-0.5),
        bias=rnd(d_out) if bias else None,
        lora_a=rnd(r, d_in, s=d_in**-0.5),
        lora_b=rnd(d_out, r),  # never the zero init: the branch must contribute
    ), g


def _compare(t, g, scaling, *, dropout_p=0.0, frozen=("weight",), tol=None, impls=CPU_IMPLS, expect=()):
    """Forward and gradients (of everything not frozen) of each implementation that applies, vs the
    float64 reference. With dropout, the keep-mask is the one the op draws (``rand >= p`` from torch's
    generator, reseeded before each run); only ``separate`` draws it that way."""
    names = [n for n in ("x", "weight", "bias", "lora_a", "lora_b") if t[n] is not None]
    dtype = t["x"].dtype
    tol = TOL[dtype] if tol is None else tol
    keep = None
    if dropout_p > 0:
        torch.manual_seed(99)
        keep = torch.rand(t["x"].shape, dtype=torch.float32) >= dropout_p
        impls = ("separate",)
    trainable = [n for n in names if n not in frozen]
    ref_leaves = {n: t[n].detach().double().requires_grad_() for n in names}
    ref = lora_linear_reference(ref_leaves["x"], ref_leaves["weight"], ref_leaves.get("bias"), ref_leaves["lora_a"],
                                ref_leaves["lora_b"], scaling, keep=keep, dropout_p=dropout_p)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in trainable], go)
    ran, y = [], None
    for impl in impls:
        leaves = {n: t[n].detach().clone().requires_grad_(n not in frozen) for n in names}
        args = (leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_a"], leaves["lora_b"], scaling)
        if explain(lora_linear, *args, dropout_p=dropout_p, backend=impl).chosen != impl:
            continue
        torch.manual_seed(99)
        y = lora_linear(*args, dropout_p=dropout_p, backend=impl)
        grads = torch.autograd.grad(y, [leaves[n] for n in trainable], go.to(dtype)) if trainable else ()
        assert y.dtype == dtype, impl
        assert _rel(y, ref) <= tol, f"{impl}: {_rel(y, ref):.2e}"
        for n, gr, rg in zip(trainable, grads, ref_grads, strict=True):
            assert _rel(gr, rg) <= tol, f"{impl}: grad of {n}: {_rel(gr, rg):.2e}"
        ran.append(impl)
    assert ran and set(expect) <= set(ran), ran
    return y


@pytest.mark.parametrize(
    "lead,d_in,d_out,r",
    [((2, 9), 12, 7, 4), ((17,), 16, 16, 8), ((3,), 12, 7, 4), ((1, 1), 8, 5, 2), ((10,), 6, 9, 1), ((12,), 5, 4, 8)],
    ids=["3d-x", "square", "tokens<r", "one-token", "r1", "r>in"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(lead, d_in, d_out, r, bias):
    t, g = _inputs(lead, d_in, d_out, r, bias=bias, seed=d_in * 31 + r)
    _compare(t, g, 0.75)


@pytest.mark.parametrize("frozen", [(), ("weight", "bias"), ("lora_a",), ("x", "lora_b"), ("x", "weight", "bias")])
def test_every_gradient_subset(frozen):
    """W frozen or trained (full fine-tuning), x with or without grad, one LoRA factor frozen."""
    t, g = _inputs((4, 6), 10, 8, 3, seed=2)
    _compare(t, g, 2.0, frozen=frozen)


@pytest.mark.parametrize("lead", [(5, 6), (2,)], ids=["merged-path", "tokens<r"])
def test_dropout_seeded_equals_reference(lead):
    t, g = _inputs(lead, 12, 7, 4, seed=3)
    y = _compare(t, g, 0.5, dropout_p=0.3, frozen=())
    plain = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5)
    assert _rel(y.detach(), plain) > 1e-3  # dropout actually changed the LoRA branch


def test_dropout_is_unbiased_and_only_on_the_branch():
    t, g = _inputs((4000,), 6, 5, 2, bias=True, seed=4)
    x1 = t["x"][:1].expand(4000, -1)  # the same row, 4000 independent draws
    y = lora_linear(x1, t["weight"], t["bias"], t["lora_a"], t["lora_b"], 1.0, dropout_p=0.4)
    plain = lora_linear(t["x"][:1], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 1.0)
    assert _rel(y.mean(0, keepdim=True), plain) < 0.02
    assert y.std(0).mean() > 1e-3
    # with the branch switched off (scaling 0) dropout has no effect: the base path is never dropped
    y0 = lora_linear(x1, t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.0, dropout_p=0.4)
    base = torch.nn.functional.linear(t["x"][:1], t["weight"], t["bias"])
    assert torch.allclose(y0, base.expand_as(y0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(3, 11), (2,)])
def test_half_precision(dtype, lead):
    t, g = _inputs(lead, 32, 24, 4, dtype=dtype, seed=5)
    _compare(t, g, 2.0, frozen=())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
def test_autocast_runs_in_the_autocast_dtype(x_dtype):
    """Inside torch.autocast the layer runs like nn.Linear there: operands cast to bf16, output in
    bf16, the fp32 factors' gradients in fp32. A bf16 x (the layer before ran under autocast) and
    fp32 weights used to raise a dtype mismatch."""
    t, g = _inputs((5, 7), 16, 12, 4, seed=12)
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    leaves = [t[n].to(x_dtype if n == "x" else torch.float32).requires_grad_(n != "weight") for n in names]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(*leaves, 2.0)
    assert y.dtype == torch.bfloat16
    go = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    train = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(y, train, go)
    cast = [leaf.detach().clone().requires_grad_(leaf.requires_grad) for leaf in leaves]
    y_ref = lora_linear(*(c.to(torch.bfloat16) for c in cast), 2.0)
    ref_grads = torch.autograd.grad(y_ref, [c for c in cast if c.requires_grad], go)
    assert torch.equal(y, y_ref)
    for gr, rg, leaf in zip(grads, ref_grads, train, strict=True):
        assert gr.dtype == leaf.dtype and torch.equal(gr, rg)


def test_gradcheck_float64():
    t, g = _inputs((2, 3), 5, 4, 2, dtype=torch.float64, seed=6)
    for n_tokens in ((2, 3), (1,)):  # merged path and tokens <= r path
        x = torch.randn(*n_tokens, 5, generator=g, dtype=torch.float64).requires_grad_()
        leaves = [x] + [t[n].clone().requires_grad_() for n in ("weight", "bias", "lora_a", "lora_b")]

        def fn(x, w, b, a, bb):
            return lora_linear(x, w, b, a, bb, 1.7)

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_with_dropout_fixed_seed():
    """Dropout is deterministic under a fixed seed, so gradcheck applies to it too."""
    t, g = _inputs((3,), 5, 4, 2, dtype=torch.float64, seed=7)
    leaves = [t[n].clone().requires_grad_() for n in ("x", "weight", "bias", "lora_a", "lora_b")]

    def fn(x, w, b, a, bb):
        torch.manual_seed(0)
        return lora_linear(x, w, b, a, bb, 0.9, dropout_p=0.5)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_matches_peft_lora_linear():
    """Same weights in PEFT's lora.Linear give the same output and gradients."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    t, g = _inputs((3, 5), 16, 12, 4, seed=8)
    base = torch.nn.Linear(16, 12)
    with torch.no_grad():
        base.weight.copy_(t["weight"])
        base.bias.copy_(t["bias"])
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t["lora_a"])
        layer.lora_B["default"].weight.copy_(t["lora_b"])
    scaling = layer.scaling["default"]
    x1 = t["x"].clone().requires_grad_()
    y_peft = layer(x1)
    go = torch.randn(y_peft.shape, generator=g)
    y_peft.backward(go)
    x2 = t["x"].clone().requires_grad_()
    a, b = t["lora_a"].clone().requires_grad_(), t["lora_b"].clone().requires_grad_()
    y = lora_linear(x2, base.weight, base.bias, a, b, scaling)
    y.backward(go)
    assert _rel(y.detach(), y_peft.detach()) <= 1e-5
    assert _rel(x2.grad, x1.grad) <= 1e-5
    assert _rel(a.grad, layer.lora_A["default"].weight.grad) <= 1e-5
    assert _rel(b.grad, layer.lora_B["default"].weight.grad) <= 1e-5


def test_backend_selection_and_explain():
    t, _ = _inputs((3,), 6, 5, 2, seed=9)
    a = lora_linear(*t.values(), 1.0, backend="torch")
    with use_backend("torch"):
        b = lora_linear(*t.values(), 1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not one of"):
        lora_linear(*t.values(), 1.0, backend="xformers")
    with use_backend("xformers"):  # an implementation of another op: this one chooses as usual
        assert explain(lora_linear, *t.values(), 1.0).chosen == "merged"
    e = explain(lora_linear, *t.values(), 1.0, dropout_p=0.1)
    assert e.chosen == "separate" and "dropout" in e.declined["merged"]


def _bad_cases():
    yield "x-features", dict(x=torch.randn(3, 7)), "features"
    yield "weight-rank", dict(weight=torch.randn(5, 6, 1)), "2-D"
    yield "lora-a-shape", dict(lora_a=torch.randn(2, 7)), "lora_a"
    yield "lora-b-shape", dict(lora_b=torch.randn(5, 3)), "lora_b"
    yield "bias-shape", dict(bias=torch.randn(6)), "bias"
    yield "dtype", dict(lora_a=torch.randn(2, 6, dtype=torch.float64)), "dtype"
    yield "scaling-inf", dict(scaling=float("inf")), "scaling"
    yield "scaling-tensor", dict(scaling=torch.tensor(1.0)), "scaling"
    yield "dropout", dict(dropout_p=1.5), "dropout_p"
    yield "int-x", dict(x=torch.ones(3, 6, dtype=torch.int64)), "floating"
    yield "r0", dict(lora_a=torch.randn(0, 6), lora_b=torch.randn(5, 0)), "r >= 1"


@pytest.mark.parametrize("name,override,message", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(name, override, message):
    t, _ = _inputs((3,), 6, 5, 2, seed=10)
    kw = dict(t, scaling=1.0, dropout_p=0.0)
    kw.update(override)
    with pytest.raises(ValueError, match=message):
        lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["scaling"],
                    dropout_p=kw["dropout_p"])


def _factor_grads_or_fail():
    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"
    assert _ext.has_kernel("lora_factor_grads", "CPU"), "lora_factor_grads is registered in every build"
    return torch.ops.ptpeft_fast.lora_factor_grads


@pytest.mark.parametrize("n,d_in,d_out,r", [(37, 40, 24, 8), (29, 24, 33, 16), (30, 16, 8, 24), (41, 48, 40, 32),
                                            (10, 8, 8, 8), (300, 72, 56, 16), (2000, 256, 200, 16)],
                         ids=["r8-tail", "r16-odd-out", "r24", "r32", "fewer-rows-than-a-block", "many-blocks",
                              "threads-split-rows"])
def test_fused_factor_grads_match_reference(n, d_in, d_out, r):
    """merged_cpp's C++ (dA, dB) op (every build has it; auto takes it from the avx512 build only),
    on shapes that leave partial row blocks."""
    _factor_grads_or_fail()
    t, g = _inputs((n,), d_in, d_out, r, bias=False, seed=n + r)
    _compare(t, g, 1.5, expect=("merged_cpp", "merged", "separate"))


def test_fused_factor_grads_op_direct_with_strided_rows():
    """Row strides of X and dY (views of wider tensors) are honoured; the result is scaled."""
    op = _factor_grads_or_fail()
    g = torch.Generator().manual_seed(3)
    xw = torch.randn(50, 70, generator=g, dtype=torch.float64)
    dyw = torch.randn(50, 45, generator=g, dtype=torch.float64)
    a = torch.randn(16, 64, generator=g, dtype=torch.float64)
    b = torch.randn(40, 16, generator=g, dtype=torch.float64)
    x, dy = xw[:, 3:67], dyw[:, :40]  # [50, 64] and [50, 40], non-contiguous rows
    da, db = op(xw.float()[:, 3:67], dyw.float()[:, :40], a.float(), b.float(), 0.5)
    ref_da = 0.5 * (dy @ b).t() @ x
    ref_db = 0.5 * dy.t() @ (x @ a.t())
    assert da.shape == (16, 64) and db.shape == (40, 16) and da.is_contiguous() and db.is_contiguous()
    assert _rel(da, ref_da) <= 1e-5 and _rel(db, ref_db) <= 1e-5


def test_merged_cpp_is_chosen_only_where_it_applies_and_pays():
    from ptpeft_fast import _ext

    _factor_grads_or_fail()
    t, _ = _inputs((20,), 24, 16, 16, seed=1)
    args = [t[n].clone().requires_grad_(n != "weight") for n in ("x", "weight", "bias", "lora_a", "lora_b")]
    e = explain(lora_linear, *args, 1.0)
    assert e.chosen == ("merged_cpp" if _ext.loaded_variant() == "avx512" else "merged"), e
    for r in (4, 40):
        t, _ = _inputs((20,), 24, 16, r, seed=r)
        args = [t[n].clone().requires_grad_(n != "weight") for n in ("x", "weight", "bias", "lora_a", "lora_b")]
        assert "rank" in explain(lora_linear, *args, 1.0, backend="merged_cpp").declined["merged_cpp"]
    t64, _ = _inputs((20,), 24, 16, 16, dtype=torch.float64, seed=2)
    args = [t64[n].clone().requires_grad_() for n in ("x", "weight", "bias", "lora_a", "lora_b")]
    assert "fp32 only" in explain(lora_linear, *args, 1.0, backend="merged_cpp").declined["merged_cpp"]
