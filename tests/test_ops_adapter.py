"""adapter: every CPU implementation of its dispatch table (blocked_cpp, fused and the torch
reference), chosen through the public switch, against the float64 reference (design §5)."""
from __future__ import annotations

import pytest
import torch
from _oracles import adapter_reference

from ptpeft_fast.ops import adapter, explain, use_backend

CPU_IMPLS = ("blocked_cpp", "fused", "torch")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    return ((out - ref).norm() / ref.norm()).item()


def _inputs(lead, d, m, *, d_out=None, down_bias=True, up_bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    t = dict(
        x=rnd(*lead, d),
        down_weight=rnd(m, d, s=d**-0.5),
        down_bias=rnd(m) if down_bias else None,
        up_weight=rnd(d_out, m, s=m**-0.5),  # never the zero init: the branch must contribute
        up_bias=rnd(d_out) if up_bias else None,
    )
    return t, g


def _compare(t, g, activation, residual, *, frozen=(), tol=None, impls=CPU_IMPLS, expect=()):
    """Forward and gradients of each implementation that applies vs the float64 reference."""
    names = [n for n in NAMES if t[n] is not None]
    dtype = t["x"].dtype
    tol = TOL[dtype] if tol is None else tol
    trainable = [n for n in names if n not in frozen]
    ref_leaves = {n: t[n].detach().double().requires_grad_() for n in names}
    ref = adapter_reference(*(ref_leaves.get(n) for n in NAMES), activation=activation, residual=residual)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in trainable], go)
    ran, y = [], None
    for impl in impls:
        leaves = {n: t[n].detach().clone().requires_grad_(n not in frozen) for n in names}
        args = [leaves.get(n) for n in NAMES]
        if explain(adapter, *args, activation=activation, residual=residual, backend=impl).chosen != impl:
            continue
        y = adapter(*args, activation=activation, residual=residual, backend=impl)
        grads = torch.autograd.grad(y, [leaves[n] for n in trainable], go.to(dtype))
        assert y.dtype == dtype, impl
        assert _rel(y, ref) <= tol, f"{impl}: {_rel(y, ref):.2e}"
        for n, gr, rg in zip(trainable, grads, ref_grads, strict=True):
            assert gr.shape == rg.shape, (impl, n)
            assert _rel(gr, rg) <= tol, f"{impl}: grad of {n}: {_rel(gr, rg):.2e}"
        ran.append(impl)
    assert ran and set(expect) <= set(ran), ran
    return y


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["both-bias", "no-down-bias", "no-up-bias", "no-bias"])
def test_matches_reference_fp32(activation, residual, biases):
    t, g = _inputs((3, 5), 16, 4, d_out=None if residual else 11, down_bias=biases[0], up_bias=biases[1], seed=1)
    _compare(t, g, activation, residual)


@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3, 4)], ids=["one-token", "2d-x", "4d-x"])
def test_shapes(lead):
    t, g = _inputs(lead, 12, 3, seed=2)
    _compare(t, g, "gelu", True)


@pytest.mark.parametrize("frozen", [("x",), ("down_weight", "down_bias"), ("up_weight",), ("up_bias", "x")])
def test_gradient_subsets(frozen):
    t, g = _inputs((6,), 10, 4, seed=3)
    _compare(t, g, "silu", True, frozen=frozen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_half_precision(dtype, activation):
    t, g = _inputs((4, 9), 32, 8, dtype=dtype, seed=4)
    _compare(t, g, activation, True)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck_float64(activation, residual):
    t, g = _inputs((2, 3), 5, 3, d_out=None if residual else 4, dtype=torch.float64, seed=5)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        with torch.no_grad():
            h = t["x"] @ t["down_weight"].t() + t["down_bias"]
            t["down_bias"] += torch.where(h.abs() < 1e-3, 1e-2, 0.0).sum(dim=(0, 1))
    leaves = [t[n].clone().requires_grad_() for n in NAMES]

    def fn(x, dw, db, uw, ub):
        return adapter(x, dw, db, uw, ub, activation=activation, residual=residual)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_identity_at_zero_up_init():
    """An adapter whose up-projection is zero (its usual init) returns x exactly."""
    t, _ = _inputs((3, 4), 8, 2, seed=6)
    y = adapter(t["x"], t["down_weight"], t["down_bias"], torch.zeros_like(t["up_weight"]),
                torch.zeros_like(t["up_bias"]))
    assert torch.equal(y, t["x"])


def test_backend_selection_torch():
    t, _ = _inputs((3,), 6, 2, seed=7)
    a = adapter(*t.values(), backend="torch")
    with use_backend("torch"):
        b = adapter(*t.values())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not one of"):
        adapter(*t.values(), backend="xformers")


def _bad_cases():
    yield "activation", dict(activation="tanh"), "activation"
    yield "down-shape", dict(down_weight=torch.randn(2, 5)), "down_weight"
    yield "up-shape", dict(up_weight=torch.randn(6, 3)), "up_weight"
    yield "up-residual-dim", dict(up_weight=torch.randn(7, 2), up_bias=torch.randn(7)), "d_out == d"
    yield "down-bias", dict(down_bias=torch.randn(3)), "down_bias"
    yield "up-bias", dict(up_bias=torch.randn(5)), "up_bias"
    yield "dtype", dict(up_bias=torch.randn(6, dtype=torch.float64)), "dtype"
    yield "int-x", dict(x=torch.ones(3, 6, dtype=torch.int64)), "floating"
    yield "not-tensor", dict(down_weight=[[1.0]]), "torch.Tensor"


@pytest.mark.parametrize("name,override,message", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(name, override, message):
    t, _ = _inputs((3,), 6, 2, seed=8)
    kw = dict(t, activation="relu")
    kw.update(override)
    with pytest.raises(ValueError, match=message):
        adapter(*(kw[n] for n in NAMES), activation=kw["activation"])


# --- the row-blocked C++ path (csrc/adapter_cpu.cpp): CPU fp32/fp64, any rows (auto: its measured range) ---


def _blocked_or_fail():
    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("biases", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["both-bias", "no-bias", "no-up-bias", "no-down-bias"])
def test_blocked_path_matches_reference(activation, residual, biases):
    """300 rows: two full blocks of 128 and a tail of 44, split over the threads (small bottlenecks,
    asked for by name, keep the test fast)."""
    _blocked_or_fail()
    t, g = _inputs((3, 100), 24, 8, d_out=None if residual else 20, down_bias=biases[0], up_bias=biases[1], seed=11)
    _compare(t, g, activation, residual, expect=("blocked_cpp", "fused", "torch"))


@pytest.mark.parametrize("frozen", [("x",), ("down_weight", "down_bias"), ("up_weight", "up_bias"),
                                    ("x", "up_weight", "up_bias")])
def test_blocked_path_gradient_subsets(frozen):
    _blocked_or_fail()
    t, g = _inputs((260,), 16, 4, seed=12)
    _compare(t, g, "gelu", True, frozen=frozen, expect=("blocked_cpp",))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_strided_rows_and_expanded_grad(impl):
    """x as a column slice of a wider tensor (row stride != d); an expanded (stride-0) output grad."""
    _blocked_or_fail()
    t, _ = _inputs((200,), 16, 4, seed=13)
    wide = torch.randn(200, 23, dtype=torch.float32)
    wide[:, 3:19] = t["x"]
    x = wide[:, 3:19].requires_grad_()
    leaves = [t[n].clone().requires_grad_() for n in NAMES[1:]]
    y = adapter(x, *leaves, activation="silu", backend=impl)
    grads = torch.autograd.grad(y.sum(), [x, *leaves])
    ref_leaves = [t[n].double().requires_grad_() for n in NAMES]
    ref = adapter_reference(*ref_leaves, activation="silu", residual=True)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    assert _rel(y, ref) <= TOL[torch.float32]
    for gr, rg in zip(grads, ref_grads, strict=True):
        assert _rel(gr, rg) <= TOL[torch.float32]


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("impl", ["blocked_cpp", "fused"])
def test_gradcheck_float64_blocked_and_fused(activation, impl):
    _blocked_or_fail()
    t, _ = _inputs((130,), 4, 2, dtype=torch.float64, seed=14)
    leaves = [t[n].clone().requires_grad_() for n in NAMES]

    def fn(x, dw, db, uw, ub):
        return adapter(x, dw, db, uw, ub, activation=activation, backend=impl)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_blocked_path_auto_only_in_its_measured_range():
    _blocked_or_fail()

    def chosen(n, d, m, dtype=torch.float32):
        x = torch.zeros(n, d, dtype=dtype)
        return explain(adapter, x, torch.zeros(m, d, dtype=dtype), None, torch.zeros(d, m, dtype=dtype), None).chosen

    assert chosen(300, 1024, 64) == "blocked_cpp"  # the benchmark shape: inside
    assert chosen(300, 1024, 16) == "fused"  # bottleneck below BLOCKED_MIN_M
    assert chosen(300, 1024, 128) == "fused"  # m·d beyond BLOCKED_MAX_MD
    assert chosen(300, 4096, 64) == "fused"
    assert chosen(128, 1024, 64) == "fused"  # one block
    assert chosen(300, 1024, 64, torch.float16) == "fused"


def test_autocast_runs_in_the_autocast_dtype():
    """Inside torch.autocast the adapter runs like nn.Linear there: operands cast to bf16, the
    output in bf16, fp32 parameters' gradients in fp32 (they used to raise a dtype mismatch)."""
    t, g = _inputs((300,), 16, 4, seed=16)
    leaves = [t[n].clone().requires_grad_() for n in NAMES]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = adapter(*leaves, activation="gelu")
    assert y.dtype == torch.bfloat16
    go = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    grads = torch.autograd.grad(y, leaves, go)
    cast = [t[n].clone().requires_grad_() for n in NAMES]
    y_ref = adapter(*(c.to(torch.bfloat16) for c in cast), activation="gelu")
    ref_grads = torch.autograd.grad(y_ref, cast, go)
    assert torch.equal(y, y_ref)
    for gr, rg, leaf in zip(grads, ref_grads, leaves, strict=True):
        assert gr.dtype == leaf.dtype == torch.float32 and torch.equal(gr, rg)
