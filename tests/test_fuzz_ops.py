"""Hypothesis fuzz of the public ops against the float64 torch reference (ops/_reference.py).

Shapes (GQA/MQA, L != S, tiny and empty dimensions), dtypes, masks (bool and additive,
broadcast shapes, fully masked rows), causal flags, shared and per-batch prefixes, strided
and non-contiguous inputs. The contract: the result matches the reference within the
dtype's tolerance (design §5), or the op raises a ``ValueError`` with a message; it never
returns wrong numbers, NaN or a wrong shape.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from _oracles import (
    adapter_reference,
    lora_linear_reference,
    prefix_attention_reference,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptpeft_fast import ops

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return math.inf
    # an exactly-zero reference (e.g. dq of a query that sees only masked keys and the prefix) is
    # compared absolutely at a 1e-3 scale: inputs are O(1), so this only absorbs rounding noise
    return ((out - ref).norm() / ref.norm().clamp_min(1e-3)).item()


def randn(g: torch.Generator, shape, dtype, contiguous: bool) -> torch.Tensor:
    """A random tensor; ``contiguous=False`` gives a transposed or strided view with the same values layout."""
    if contiguous or len(shape) < 2:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    # store with the last two dims swapped and every other column, then view back: non-contiguous, strided
    big = torch.randn(*shape[:-2], shape[-1], 2 * shape[-2], generator=g, dtype=torch.float64).to(dtype)
    t = big[..., ::2].transpose(-1, -2)
    assert t.shape == tuple(shape)
    return t


def check(call, reference, dtype, inputs, grads: bool) -> None:
    """Run ``call`` (op) and ``reference`` (float64); compare outputs and, if asked, input gradients."""
    leaves = [t.detach().requires_grad_(grads) if t is not None and t.is_floating_point() else t for t in inputs]
    try:
        out = call(*leaves)
    except ValueError as e:  # refused: fine, as long as it says something
        assert len(str(e)) > 20, f"unclear error: {e!r}"
        return
    ref_in = [t.detach().double().requires_grad_(grads) if t is not None and t.is_floating_point() else t
              for t in inputs]
    ref = reference(*ref_in)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == dtype
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"forward rel err {err:.3g} > {TOL[dtype]}"
    if grads and out.numel():
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out.backward(g.to(dtype))
        ref.backward(g)
        for i, (a, b) in enumerate(zip(leaves, ref_in, strict=True)):
            if a is None or not a.is_floating_point():
                continue
            ga = a.grad if a.grad is not None else torch.zeros_like(a)
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            e = rel_err(ga, gb)
            assert e <= GRAD_TOL[dtype], f"grad of input {i}: rel err {e:.3g}"


# ----------------------------------------------------------------------------- prefix attention
@st.composite
def attention_case(draw, dtypes=DTYPES, allow_dropout_shapes=True):
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3]))
    L = draw(st.integers(1, 6))
    S = draw(st.integers(1, 7))
    P = draw(st.integers(1, 4))
    D = draw(st.sampled_from([1, 3, 8, 16]))
    return dict(
        B=B, H=Hkv * G, Hkv=Hkv, L=L, S=S, P=P, D=D,
        dtype=draw(dtypes),
        mask=draw(st.sampled_from(["none", "causal", "bool_b1ls", "bool_ls", "bool_bhls", "float_b1ls",
                                   "bool_with_empty_rows"])),
        shared=draw(st.booleans()),
        contiguous=draw(st.booleans()),
        last_dim_strided=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3])),
        seed=draw(st.integers(0, 2**16)),
    )


def sliced(g: torch.Generator, shape, dtype, dim: int) -> torch.Tensor:
    """Non-contiguous (every other entry along ``dim``), last dim still unit-stride."""
    big = list(shape)
    big[dim] *= 2
    t = torch.randn(big, generator=g, dtype=torch.float64).to(dtype)
    return t[(slice(None),) * (dim % len(shape)) + (slice(None, None, 2),)]


def make_attention_inputs(c, last_dim_strided: bool | None = None):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, L, S, P, D = c["B"], c["H"], c["Hkv"], c["L"], c["S"], c["P"], c["D"]
    dt, cont = c["dtype"], c["contiguous"]
    if cont:
        q = randn(g, (B, H, L, D), dt, True)
        k = randn(g, (B, Hkv, S, D), dt, True)
        v = randn(g, (B, Hkv, S, D), dt, True)
    else:  # transformers' layout [B, L, H, D] transposed to [B, H, L, D], and sliced views
        q = randn(g, (B, L, H, D), dt, True).transpose(1, 2)
        k = sliced(g, (B, S, Hkv, D), dt, 1).transpose(1, 2)
        v = sliced(g, (B, Hkv, S, D), dt, 0)
    if last_dim_strided is None:
        last_dim_strided = c.get("last_dim_strided", False)
    if last_dim_strided:  # every other element of the head dim: stride 2 on the last dim
        q, k, v = (randn(g, t.shape, dt, False) for t in (q, k, v))
    pshape = (Hkv, P, D) if c["shared"] else (B, Hkv, P, D)
    pk = randn(g, pshape, dt, True) if cont else sliced(g, pshape, dt, -2)
    pv = randn(g, pshape, dt, True) if cont else randn(g, pshape, dt, False)  # prefixes: any strides
    mask, causal = None, c["mask"] == "causal"
    kind = c["mask"]
    if kind.startswith("bool"):
        shape = {"bool_b1ls": (B, 1, L, S), "bool_ls": (L, S), "bool_bhls": (B, H, L, S),
                 "bool_with_empty_rows": (B, 1, L, S)}[kind]
        mask = torch.rand(shape, generator=g) > 0.4
        if kind == "bool_with_empty_rows":
            mask[..., 0, :] = False  # the first query sees no real key: only the prefix
    elif kind == "float_b1ls":
        mask = torch.where(torch.rand((B, 1, L, S), generator=g) > 0.3, 0.0, -math.inf).to(dt)
        mask = mask + torch.randn(mask.shape, generator=g).to(dt) * 0.1  # a bias, not only 0/-inf
    return q, k, v, pk, pv, mask, causal


@FUZZ
@given(attention_case())
def test_prefix_attention_matches_reference(c):
    q, k, v, pk, pv, mask, causal = make_attention_inputs(c)
    grads = c["dtype"] in GRAD_TOL

    def op(q, k, v, pk, pv, mask):
        return ops.prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask, scale=c["scale"], backend="torch")

    def ref(q, k, v, pk, pv, mask):
        return prefix_attention_reference(q, k, v, pk, pv, causal=causal, attn_mask=mask, scale=c["scale"])

    check(op, ref, c["dtype"], [q, k, v, pk, pv, mask], grads)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(attention_case(dtypes=st.sampled_from([torch.float32])))
def test_prefix_attention_triton_interpreter_matches_reference(c):
    pytest.importorskip("triton")
    from ptpeft_fast.ops.availability import interpreter_on

    if not interpreter_on():
        pytest.skip("TRITON_INTERPRET=1 is not set")
    q, k, v, pk, pv, mask, causal = make_attention_inputs(c)
    e = ops.explain(ops.prefix_attention, q, k, v, pk, pv, causal=causal, attn_mask=mask, backend="triton")
    # the kernel takes every case but empty batches/queries and masks that are not padding/causal
    # ranges, which the table sends elsewhere (saying so)
    backend = "triton" if e.chosen == "triton" else "auto"
    declined = e.declined.get("triton", "")
    assert backend == "triton" or "empty" in declined or "a mask the kernel cannot take" in declined, e

    def op(q, k, v, pk, pv, mask):
        return ops.prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask, scale=c["scale"], backend=backend)

    def ref(q, k, v, pk, pv, mask):
        return prefix_attention_reference(q, k, v, pk, pv, causal=causal, attn_mask=mask, scale=c["scale"])

    check(op, ref, c["dtype"], [q, k, v, pk, pv, mask], grads=False)


# --- Cases that were op bugs (found by this fuzz, fixed in ops/prefix_attention.py): the torch
# path called ATen's CPU flash kernel on inputs it cannot take.


def test_prefix_attention_last_dim_strided_inputs():
    c = dict(B=2, H=2, Hkv=1, L=3, S=4, P=2, D=8, dtype=torch.float32, mask="none", shared=True, contiguous=True,
             scale=None, seed=0)
    q, k, v, pk, pv, mask, causal = make_attention_inputs(c, last_dim_strided=True)
    assert q.stride(-1) != 1 and k.stride(-1) != 1
    out = ops.prefix_attention(q, k, v, pk, pv, causal=False, backend="torch")
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double(), causal=False)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_prefix_attention_empty_batch():
    q = torch.randn(0, 2, 3, 8, requires_grad=True)
    k, v = torch.randn(0, 1, 3, 8), torch.randn(0, 1, 3, 8)
    pk, pv = torch.randn(1, 2, 8, requires_grad=True), torch.randn(1, 2, 8)
    out = ops.prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    assert out.shape == (0, 2, 3, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and not pk.grad.any()


def test_prefix_attention_3d_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 3, 8, generator=g)
    k, v = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 4, 8, generator=g)
    pk, pv = torch.randn(1, 2, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    mask = torch.randn(1, 3, 4, generator=g)
    out = ops.prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=mask, backend="torch")
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double(), causal=False,
                                     attn_mask=mask.double())
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_prefix_attention_zero_head_dim():
    q, k = torch.randn(1, 2, 3, 0), torch.randn(1, 1, 3, 0)
    with pytest.raises(ValueError):
        ops.prefix_attention(q, k, k, torch.randn(1, 2, 0), torch.randn(1, 2, 0), causal=False, backend="torch")


_EMPTY_SEQ_SCRIPT = r"""
import torch
from ptpeft_fast import ops
from _oracles import prefix_attention_reference as ref
for L, S in ((0, 3), (3, 0)):
    for causal in (False, True):
        q, k = torch.randn(1, 2, L, 8, dtype=torch.float64), torch.randn(1, 1, S, 8, dtype=torch.float64)
        pk = torch.randn(1, 2, 8, dtype=torch.float64)
        out = ops.prefix_attention(q, k, k, pk, pk, causal=causal, backend="torch")
        assert out.shape == (1, 2, L, 8), out.shape
        assert torch.allclose(out, ref(q, k, k, pk, pk, causal=causal)), (L, S)  # S = 0: the prefix alone
print("no crash")
"""


def test_prefix_attention_empty_sequence_does_not_crash():
    import subprocess
    import sys

    # in a subprocess: the bug was a SIGFPE in ATen's kernel, which would take the test runner down
    here = Path(__file__).resolve().parent  # the oracle is test code (tests/_oracles.py)
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _EMPTY_SEQ_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0 and "no crash" in proc.stdout, (proc.returncode, proc.stderr[-500:])


@FUZZ
@given(st.data())
def test_prefix_attention_bad_inputs_raise_value_error(data):
    """Malformed arguments: a ValueError naming the problem, never a result."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    pk, pv = torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g)
    case = data.draw(st.sampled_from(["heads", "dim", "prefix_heads", "prefix_dim", "dtype", "mask_shape", "mask_int",
                                      "p0", "scale", "dropout", "3d"]))
    kw: dict = dict(causal=False)
    if case == "heads":
        q = torch.randn(2, 3, 3, 8)
    elif case == "dim":
        k = v = torch.randn(2, 2, 5, 4)
    elif case == "prefix_heads":
        pk = pv = torch.randn(3, 2, 8)
    elif case == "prefix_dim":
        pk = pv = torch.randn(2, 2, 7)
    elif case == "dtype":
        pk = pk.double()
    elif case == "mask_shape":
        kw["attn_mask"] = torch.ones(2, 1, 3, 6, dtype=torch.bool)  # prefix columns included by mistake
    elif case == "mask_int":
        kw["attn_mask"] = torch.ones(2, 1, 3, 5, dtype=torch.long)
    elif case == "p0":
        pk = pv = torch.randn(2, 0, 8)
    elif case == "scale":
        kw["scale"] = float("nan")
    elif case == "dropout":
        kw["dropout_p"] = 1.0
    elif case == "3d":
        q = torch.randn(4, 3, 8)
    with pytest.raises(ValueError) as e:
        ops.prefix_attention(q, k, v, pk, pv, backend="torch", **kw)
    assert len(str(e.value)) > 20


# ----------------------------------------------------------------------------- LoRA linear
@FUZZ
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    fin=st.integers(1, 12), fout=st.integers(1, 12), r=st.integers(1, 6),
    bias=st.booleans(), dtype=DTYPES, contiguous=st.booleans(), conv1d_weight=st.booleans(),
    scaling=st.sampled_from([0.5, 2.0, -1.0]), seed=st.integers(0, 2**16),
)
def test_lora_linear_matches_reference(lead, fin, fout, r, bias, dtype, contiguous, conv1d_weight, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, (*lead, fin), dtype, contiguous) if lead else randn(g, (fin,), dtype, True)
    # a transformers Conv1D stores [in, out]: the LoRA layer passes weight.t(), a non-contiguous view
    w = randn(g, (fin, fout), dtype, True).t() if conv1d_weight else randn(g, (fout, fin), dtype, True)
    b = randn(g, (fout,), dtype, True) if bias else None
    a, bb = randn(g, (r, fin), dtype, contiguous), randn(g, (fout, r), dtype, True)
    grads = dtype in GRAD_TOL

    def op(x, w, b, a, bb):
        return ops.lora_linear(x, w, b, a, bb, scaling, backend="torch")

    def ref(x, w, b, a, bb):
        return lora_linear_reference(x, w, b, a, bb, scaling)

    check(op, ref, dtype, [x, w, b, a, bb], grads)


def test_lora_linear_dropout_is_seeded_and_finite():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    a, b = torch.randn(2, 7, generator=g), torch.randn(3, 2, generator=g)
    torch.manual_seed(3)
    y1 = ops.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    y2 = ops.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5, backend="torch")
    assert torch.equal(y1, y2) and torch.isfinite(y1).all()


# ----------------------------------------------------------------------------- adapter
@FUZZ
@given(
    lead=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    d=st.integers(1, 12), m=st.integers(1, 8), activation=st.sampled_from(["relu", "gelu", "silu"]),
    down_bias=st.booleans(), up_bias=st.booleans(), residual=st.booleans(), dtype=DTYPES,
    contiguous=st.booleans(), seed=st.integers(0, 2**16),
)
def test_adapter_matches_reference(lead, d, m, activation, down_bias, up_bias, residual, dtype, contiguous, seed):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, (*lead, d), dtype, contiguous)
    dw, uw = randn(g, (m, d), dtype, contiguous), randn(g, (d, m), dtype, True)
    db = randn(g, (m,), dtype, True) if down_bias else None
    ub = randn(g, (d,), dtype, True) if up_bias else None
    grads = dtype in GRAD_TOL

    def op(x, dw, db, uw, ub):
        return ops.adapter(x, dw, db, uw, ub, activation=activation, residual=residual, backend="torch")

    def ref(x, dw, db, uw, ub):
        return adapter_reference(x, dw, db, uw, ub, activation=activation, residual=residual)

    check(op, ref, dtype, [x, dw, db, uw, ub], grads)
