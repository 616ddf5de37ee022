"""prefix_attention (torch path) against the float64 concatenation reference (DESIGN §2, §5)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ptpeft_fast.ops import prefix_attention, use_backend
from ptpeft_fast.ops._reference import prefix_attention_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    return ((out - ref).norm() / ref.norm()).item()


def _inputs(B, H, Hkv, L, S, P, D, *, shared=True, dtype=torch.float32, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(B, H, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    if transposed:  # transformers' layout: [B, L, H, D] memory viewed as [B, H, L, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    return q, k, v, rnd(*pshape), rnd(*pshape), g


def _padding_mask(B, L, S, lengths, side, causal):
    """bool [B,1,L,S] as transformers passes it: padding (and causality) over real keys."""
    key_ok = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            key_ok[b, S - n:] = True
        else:
            key_ok[b, :n] = True
    mask = key_ok[:, None, None, :].expand(B, 1, L, S).clone()
    if causal:
        mask &= torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)
    return mask


def _compare(q, k, v, pk, pv, g, *, causal, attn_mask=None, scale=None, tol=None, check_mask_grad=False):
    """Forward and every gradient of the op vs the float64 reference on the same inputs."""
    dtype = q.dtype
    tol = TOL[dtype] if tol is None else tol
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    mask = attn_mask
    if check_mask_grad:
        mask = attn_mask.detach().clone().requires_grad_()
        leaves.append(mask)
    out = prefix_attention(*leaves[:5], causal=causal, attn_mask=mask, scale=scale, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, go)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_mask = None
    if attn_mask is not None:
        ref_mask = ref_leaves[5] if check_mask_grad else (attn_mask if attn_mask.dtype == torch.bool else attn_mask.double())
    ref = prefix_attention_reference(*ref_leaves[:5], causal=causal, attn_mask=ref_mask, scale=scale)
    assert torch.isfinite(ref).all()
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())

    assert _rel(out, ref) <= tol
    names = ["q", "k", "v", "prefix_k", "prefix_v", "attn_mask"]
    for name, gr, rg in zip(names, grads, ref_grads):
        assert gr.shape == rg.shape, name
        assert _rel(gr, rg) <= tol, f"grad of {name}: rel err {_rel(gr, rg):.2e} > {tol}"
    return out


# (B, H, Hkv, L, S, P, D, causal)
SHAPES = {
    "mha-causal": (2, 4, 4, 7, 7, 3, 16, True),
    "mha-noncausal": (2, 4, 4, 7, 7, 3, 16, False),
    "P1": (2, 4, 4, 6, 6, 1, 8, True),
    "L1-decode": (3, 4, 2, 1, 9, 4, 16, True),
    "L1-S1": (2, 2, 2, 1, 1, 2, 8, True),
    "gqa-8:2": (2, 8, 2, 6, 6, 3, 16, True),
    "mqa-8:1": (2, 8, 1, 6, 6, 3, 16, True),
    "cross-S>L": (2, 4, 2, 5, 9, 2, 16, False),
    "causal-S>L-bottom-right": (2, 4, 2, 5, 9, 2, 16, True),
    "causal-S<L-rows-see-only-prefix": (2, 4, 2, 9, 5, 2, 16, True),
    "B1": (1, 4, 4, 8, 8, 5, 32, True),
    "head-dim-80-gqa-6:3": (2, 6, 3, 5, 5, 4, 80, True),
}


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "per-batch-prefix"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_fp32(shape, shared):
    B, H, Hkv, L, S, P, D, causal = shape
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, shared=shared, seed=hash(shape) % 1000)
    _compare(q, k, v, pk, pv, g, causal=causal)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_masks(side, causal):
    B, H, Hkv, L, P, D = 3, 4, 2, 6, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, seed=3)
    mask = _padding_mask(B, L, L, [6, 4, 1], side, causal)
    _compare(q, k, v, pk, pv, g, causal=causal, attn_mask=mask)


def test_padding_mask_with_kv_cache_and_gqa():
    B, H, Hkv, L, S, P, D = 2, 8, 2, 3, 8, 2, 16
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, shared=False, seed=4)
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=_padding_mask(B, L, S, [8, 5], "left", True))


def test_fully_padded_query_row_attends_to_prefix_only():
    B, H, Hkv, L, P, D = 2, 4, 4, 5, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, seed=5)
    mask = _padding_mask(B, L, L, [5, 3], "left", True)
    mask[0, :, 2, :] = False  # row with no real key at all
    out = _compare(q, k, v, pk, pv, g, causal=True, attn_mask=mask)
    # that row is exactly attention over the prefix alone
    scores = q[0, :, 2].unsqueeze(1).double() @ pk.double().transpose(-1, -2) / math.sqrt(D)  # [H, 1, P]
    only_prefix = (torch.softmax(scores, -1) @ pv.double()).squeeze(1)
    assert _rel(out[0, :, 2], only_prefix) <= 1e-5


def test_float_mask_with_neg_inf_rows():
    B, H, L, P, D = 2, 4, 5, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=6)
    mask = torch.randn(B, 1, L, L, generator=g)
    mask[1, 0, 3, :] = float("-inf")  # fully masked row
    mask[0, 0, :, 1] = float("-inf")
    _compare(q, k, v, pk, pv, g, causal=False, attn_mask=mask)


@pytest.mark.parametrize("mask_shape", [(2, 4, 5, 7), (2, 1, 5, 7), (5, 7), (1, 4, 5, 7), (2, 1, 1, 7)])
def test_additive_float_mask_broadcast_shapes(mask_shape):
    """T5 passes a float position bias [B,H,L,S]; other shapes broadcast."""
    B, H, Hkv, L, S, P, D = 2, 4, 2, 5, 7, 3, 8
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=7)
    mask = torch.randn(mask_shape, generator=g)
    _compare(q, k, v, pk, pv, g, causal=False, attn_mask=mask)


def test_trainable_position_bias_gets_gradient():
    """A float mask that requires grad (T5 relative bias in full fine-tuning) gets its gradient."""
    B, H, L, P, D = 2, 4, 5, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=8)
    bias = torch.randn(1, H, L, L, generator=g)
    _compare(q, k, v, pk, pv, g, causal=False, attn_mask=bias, check_mask_grad=True)


def test_causal_with_mask_applies_mask_only():
    """causal=True plus a mask: the mask already encodes causality and is applied as is."""
    B, H, L, P, D = 2, 2, 5, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=9)
    full = torch.ones(B, 1, L, L, dtype=torch.bool)
    with_causal_flag = prefix_attention(q, k, v, pk, pv, causal=True, attn_mask=full)
    without = prefix_attention(q, k, v, pk, pv, causal=False)
    assert _rel(with_causal_flag, without) <= 1e-6


def test_custom_scale_and_transposed_layout():
    B, H, Hkv, L, P, D = 2, 8, 2, 6, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, seed=10, transposed=True)
    assert not q.is_contiguous()
    _compare(q, k, v, pk, pv, g, causal=True, scale=0.3)
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, shared=False, seed=11, transposed=True)
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=_padding_mask(B, L, L, [6, 2], "left", True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
def test_half_precision(dtype, shared):
    B, H, Hkv, L, P, D = 2, 8, 2, 9, 3, 32
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, shared=shared, dtype=dtype, seed=12)
    _compare(q, k, v, pk, pv, g, causal=True)
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=_padding_mask(B, L, L, [9, 4], "left", True))


def test_autocast_runs_in_the_autocast_dtype():
    """Inside torch.autocast: bf16 q/k/v (from autocast projections) with fp32 prefix parameters
    run in bf16, as SDPA does there; the prefix gets fp32 gradients (a dtype error before)."""
    B, H, Hkv, L, P, D = 2, 4, 2, 6, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, seed=21)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    pk, pv = pk.requires_grad_(), pv.requires_grad_()
    mask = torch.randn(B, 1, L, L, generator=g)  # an additive float mask is cast as well
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    go = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    grads = torch.autograd.grad(out, [q, k, v, pk, pv], go)
    cast = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = prefix_attention(*(c.to(torch.bfloat16) for c in cast), causal=False, attn_mask=mask.to(torch.bfloat16))
    ref_grads = torch.autograd.grad(ref, cast, go)
    assert torch.equal(out, ref)
    for gr, rg, leaf in zip(grads, ref_grads, (q, k, v, pk, pv)):
        assert gr.dtype == leaf.dtype and torch.equal(gr, rg)


@pytest.mark.parametrize(
    "shape,shared,mask_kind",
    [
        ((2, 2, 2, 3, 3, 2, 4, True), True, None),
        ((2, 4, 2, 3, 5, 1, 4, True), False, None),
        ((2, 4, 1, 4, 3, 2, 4, True), True, None),
        ((2, 2, 1, 3, 3, 2, 4, True), True, "pad"),
        ((2, 2, 2, 3, 4, 2, 4, False), False, "float"),
    ],
)
def test_gradcheck_float64(shape, shared, mask_kind):
    B, H, Hkv, L, S, P, D, causal = shape
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, shared=shared, dtype=torch.float64, seed=13)
    mask = None
    if mask_kind == "pad":
        mask = _padding_mask(B, L, S, [3, 1], "left", causal)
    elif mask_kind == "float":
        mask = torch.randn(B, H, L, S, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]

    def fn(*xs):
        return prefix_attention(*xs, causal=causal, attn_mask=mask)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_float64_math_path_with_trainable_mask():
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 3, 4, 2, 4, dtype=torch.float64, seed=14)
    bias = torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, bias)]

    def fn(q, k, v, pk, pv, bias):
        return prefix_attention(q, k, v, pk, pv, causal=False, attn_mask=bias)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- dropout (math path)


@pytest.mark.parametrize("shared", [True, False])
def test_dropout_seeded_equals_reference(shared):
    """Same generator state → same keep-masks in the op and the reference (drawn prefix first)."""
    B, H, Hkv, L, P, D = 2, 4, 2, 6, 3, 8
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, shared=shared, seed=15)
    mask = _padding_mask(B, L, L, [6, 3], "left", True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    torch.manual_seed(1234)
    out = prefix_attention(*leaves, causal=True, attn_mask=mask, dropout_p=0.3)
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    torch.manual_seed(1234)
    ref = prefix_attention_reference(*ref_leaves, causal=True, attn_mask=mask, dropout_p=0.3)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    assert _rel(out, ref) <= 1e-5
    for gr, rg in zip(grads, ref_grads):
        assert _rel(gr, rg) <= 1e-5
    # dropout really dropped something: differs from the no-dropout output
    plain = prefix_attention(q, k, v, pk, pv, causal=True, attn_mask=mask)
    assert _rel(out.detach(), plain) > 1e-2


def test_dropout_is_unbiased_and_hits_the_prefix():
    """E[dropout output] = no-dropout output; prefix probabilities are dropped too."""
    B, H, L, P, D = 1, 2, 3, 4, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=16)
    torch.manual_seed(0)
    n = 2000
    qs = q.expand(n, -1, -1, -1)  # n independent draws in one call (a view, no copies of q)
    ks, vs = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
    outs = prefix_attention(qs, ks, vs, pk, pv, causal=False, dropout_p=0.5)
    plain = prefix_attention(q, k, v, pk, pv, causal=False)
    assert _rel(outs.mean(0, keepdim=True), plain) < 0.05
    assert outs.std(0).mean() > 0.05  # draws differ
    # with all-zero real values, any output variance can only come from the prefix part
    zero_v = torch.zeros_like(vs)
    outs_p = prefix_attention(qs, ks, zero_v, pk, pv, causal=False, dropout_p=0.5)
    assert outs_p.std(0).mean() > 0.05


def test_dropout_fp64_and_bf16_run():
    for dtype in (torch.float64, torch.bfloat16):
        q, k, v, pk, pv, g = _inputs(2, 4, 2, 5, 5, 2, 8, dtype=dtype, seed=17)
        out = prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=0.1)
        assert out.dtype == dtype and torch.isfinite(out).all()


# ---------------------------------------------------------------- memory contract


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("use_mask,dropout_p", [(False, 0.0), (True, 0.0), (True, 0.2)],
                         ids=["causal", "padding-mask", "dropout-math-path"])
def test_never_expands_prefix_nor_builds_full_mask(use_mask, dropout_p):
    """No op (forward or backward) outputs a batch-expanded prefix or a [.., P+S] tensor."""
    B, H, Hkv, L, S, P, D = 3, 4, 2, 5, 7, 11, 16  # distinctive sizes
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=18)
    mask = _padding_mask(B, L, S, [7, 4, 2], "left", True) if use_mask else None
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    with _RecordShapes() as rec:
        out = prefix_attention(*leaves, causal=True, attn_mask=mask, dropout_p=dropout_p)
        out.backward(torch.randn(out.shape, generator=g))
    assert rec.shapes, "nothing recorded"
    for func, shape in rec.shapes:
        assert P + S not in shape, f"{func} built a tensor over P+S keys: {shape}"
        assert not (shape[-2:] == (P, D) and math.prod(shape) >= B * Hkv * P * D), (
            f"{func} expanded the prefix over the batch: {shape}"
        )
    assert pk.grad.shape == (Hkv, P, D) and torch.isfinite(pk.grad).all()


# ---------------------------------------------------------------- backend and validation


def test_backend_selection_torch():
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 4, 4, 2, 8, seed=19)
    a = prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    with use_backend("torch"):
        b = prefix_attention(q, k, v, pk, pv, causal=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="xformers"):
        prefix_attention(q, k, v, pk, pv, causal=True, backend="xformers")
    with pytest.raises(ValueError, match="not one of"):
        prefix_attention(q, k, v, pk, pv, causal=True, backend="cuda-magic")


def _bad_cases():
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 5, 6, 3, 8, seed=20)
    yield "rank", dict(q=q[0]), "4-D"
    yield "heads", dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "multiple"
    yield "head-dim", dict(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), "head_dim"
    yield "k-v-shape", dict(v=torch.randn(2, 2, 7, 8)), "same shape"
    yield "batch", dict(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), "batch"
    yield "dtype", dict(k=k.double()), "dtype"
    yield "prefix-heads", dict(prefix_k=torch.randn(4, 3, 8), prefix_v=torch.randn(4, 3, 8)), r"\[Hkv, P, D\]"
    yield "prefix-batch", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), r"\[B, Hkv, P, D\]"
    yield "prefix-rank", dict(prefix_k=torch.randn(3, 8), prefix_v=torch.randn(3, 8)), "prefix_k/prefix_v"
    yield "prefix-kv-mismatch", dict(prefix_v=torch.randn(2, 4, 8)), "same shape"
    yield "prefix-empty", dict(prefix_k=torch.randn(2, 0, 8), prefix_v=torch.randn(2, 0, 8)), "P = 0"
    yield "mask-shape", dict(attn_mask=torch.ones(2, 1, 5, 9, dtype=torch.bool)), "broadcast"
    yield "mask-with-prefix-cols", dict(attn_mask=torch.ones(2, 1, 5, 9)), "real keys only"
    yield "mask-dtype", dict(attn_mask=torch.ones(2, 1, 5, 6, dtype=torch.int64)), "bool"
    yield "scale-nan", dict(scale=float("nan")), "scale"
    yield "dropout", dict(dropout_p=1.0), "dropout_p"
    yield "not-tensor", dict(q=[1.0]), "torch.Tensor"
    yield "int-q", dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), "floating"


@pytest.mark.parametrize("name,override,message", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error(name, override, message):
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 5, 6, 3, 8, seed=20)
    kw = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, attn_mask=None, scale=None, dropout_p=0.0)
    kw.update(override)
    with pytest.raises(ValueError, match=message):
        prefix_attention(
            kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"],
            causal=True, attn_mask=kw["attn_mask"], scale=kw["scale"], dropout_p=kw["dropout_p"],
        )


def test_gradcheck_float64_full_jacobian_tiny():
    """Slow-mode gradcheck (every Jacobian entry) on the tiniest GQA + padding case."""
    q, k, v, pk, pv, g = _inputs(2, 2, 1, 2, 3, 1, 2, dtype=torch.float64, seed=21)
    mask = _padding_mask(2, 2, 3, [3, 1], "left", True)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]

    def fn(*xs):
        return prefix_attention(*xs, causal=True, attn_mask=mask)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_prefix_only_gradients(shared):
    """Stage 1 at the first layer: q, k, v carry no grad, only the prefix trains."""
    B, H, Hkv, L, P, D = 2, 8, 2, 6, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, shared=shared, seed=22)
    mask = _padding_mask(B, L, L, [6, 2], "left", True)
    pk1, pv1 = pk.clone().requires_grad_(), pv.clone().requires_grad_()
    out = prefix_attention(q, k, v, pk1, pv1, causal=True, attn_mask=mask)
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    ref_pk, ref_pv = pk.double().requires_grad_(), pv.double().requires_grad_()
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), ref_pk, ref_pv, causal=True, attn_mask=mask)
    ref.backward(go.double())
    assert _rel(out.detach(), ref.detach()) <= 1e-5
    assert _rel(pk1.grad, ref_pk.grad) <= 1e-5
    assert _rel(pv1.grad, ref_pv.grad) <= 1e-5


@pytest.mark.parametrize("path", ["flash-prefix", "aten-flash"])
def test_causal_padding_mask_uses_kernel_causal_skip(path, monkeypatch):
    """A bool mask with nothing above the diagonal runs the kernel with its causal flag on (it
    skips the keys above the diagonal; same result)."""
    import importlib

    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")  # the module, not the function

    seen = []
    if path == "aten-flash":
        real = pa._flash_fwd

        def spy(q, k, v, dropout_p, is_causal, **kw):
            seen.append(is_causal)
            return real(q, k, v, dropout_p, is_causal, **kw)

        monkeypatch.setattr(pa, "_flash_fwd", spy)
        monkeypatch.setattr(pa, "_flash_prefix_ops", lambda *a: None)
    else:
        _, (fwd, bwd) = _flash_ops_or_fail()

        def spy_fwd(q, k, v, pk, pv, mask, causal, scale):
            seen.append(causal)
            return fwd(q, k, v, pk, pv, mask, causal, scale)

        monkeypatch.setattr(pa, "_flash_prefix_ops", lambda *a: (spy_fwd, bwd))
    B, H, L, P, D = 2, 4, 6, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=23)
    causal_pad = _padding_mask(B, L, L, [6, 3], "left", True)
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=causal_pad)
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=_padding_mask(B, L, L, [6, 3], "left", False))
    assert seen == [True, False]


def test_non_cpu_tensors_take_the_device_agnostic_path():
    """The fused kernel is CPU-only; other devices (meta here) must still get a result."""
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 5, 6, 3, 8)
    meta = [t.to("meta") for t in (q, k, v, pk, pv)]
    out = prefix_attention(*meta, causal=True, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape


@pytest.mark.parametrize("case", range(12))
def test_inference_path_matches_reference(case):
    """Without autograd (eval, generate) a shared prefix takes the folded inference path."""
    from ptpeft_fast.ops._reference import prefix_attention_reference

    g = torch.Generator().manual_seed(100 + case)
    B, Hkv, G = 1 + case % 3, (1, 2, 4)[case % 3], (1, 2, 4)[(case // 3) % 3]
    L = (1, 3, 7, 1)[case % 4]
    S = L + (0, 0, 5, 9)[(case // 2) % 4]
    D, P = (16, 32)[case % 2], 1 + case % 4
    q = torch.randn(B, Hkv * G, L, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    pk, pv = torch.randn(Hkv, P, D, generator=g), torch.randn(Hkv, P, D, generator=g)
    mask = None
    if case % 3 == 1:  # left padding with causality, one row all but one key padded
        mask = torch.ones(B, 1, L, S, dtype=torch.bool).tril(diagonal=S - L)
        mask[0, ..., : S - 1] = False
    causal = case % 2 == 0
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask, backend="torch")
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=causal, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("case", range(16))
def test_decode_op_matches_reference(case, monkeypatch):
    """No-grad calls with at most DECODE_MAX_QUERIES queries take the one-pass C++ op
    (csrc/decode_attention_cpu.cpp): float64 reference, GQA, masks of every accepted
    form, strided caches, fp32 and fp64, sizes that split across threads."""
    import importlib

    from ptpeft_fast import _ext
    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")
    assert _ext.load_ext(), f"the csrc extension must build here (DESIGN §4): {_ext.ext_error()}"
    calls = []
    real = pa._decode_op()
    assert real is not None
    monkeypatch.setattr(pa, "_decode_op", lambda: (lambda *a: calls.append(1) or real(*a)))

    g = torch.Generator().manual_seed(700 + case)
    dtype = torch.float64 if case % 5 == 4 else torch.float32
    B, Hkv, G = 1 + case % 3, (1, 2, 4)[case % 3], (1, 2, 3)[(case // 3) % 3]
    L = (1, 1, 2, 8)[case % 4]
    S = (1, 17, 64, 300)[(case // 4) % 4]
    S = max(S, L)
    D, P = (8, 64, 80, 128)[case % 4], (1, 5, 32)[(case // 2) % 3]
    H = Hkv * G

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rnd(B, L, H, D).transpose(1, 2)  # transformers' layout
    cache = rnd(2, B, Hkv, S + 7, D)  # a cache with spare room: k, v are strided views
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    kind = case % 4
    if kind == 0:
        mask, causal = None, False
    elif kind == 1:  # transformers' bool padding mask [B, 1, L, S], one row all padded
        mask = torch.ones(B, 1, L, S, dtype=torch.bool)
        mask[0, ..., : S - 1] = False
        causal = True
    elif kind == 2:  # additive float, broadcast over batch and heads
        mask, causal = rnd(L, S), False
    else:  # additive float per head
        mask, causal = rnd(B, H, L, S), True
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask, backend="torch")
    assert calls, "the decode op was not used"
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=causal, attn_mask=ref_mask)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    assert _rel(out, ref) <= tol


def test_decode_op_is_not_used_with_autograd_or_many_queries(monkeypatch):
    import importlib
    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")
    calls = []
    monkeypatch.setattr(pa, "_decode_op", lambda: calls.append(1))
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 1, 9, 3, 16)
    _compare(q, k, v, pk, pv, g, causal=True)  # training: autograd path
    q, k, v, pk, pv, g = _inputs(2, 4, 2, pa.DECODE_MAX_QUERIES + 1, 20, 3, 16)
    with torch.no_grad():
        prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")  # prefill: flash + merge
    assert not calls


@pytest.mark.parametrize("case", range(8))
def test_decode_step_entry_matches_reference(case):
    """ops.prefix_decode_step (the attention function's unchecked decode entry) equals the
    float64 reference for one query per row: masks None / bool with a fully padded row /
    additive with -inf / per head, GQA, fp32 and fp64, strided caches."""
    from ptpeft_fast import _ext
    from ptpeft_fast.ops import prefix_decode_step

    assert _ext.load_ext(), f"the csrc extension must build here (DESIGN §4): {_ext.ext_error()}"
    g = torch.Generator().manual_seed(900 + case)
    dtype = torch.float64 if case % 3 == 2 else torch.float32
    B, Hkv, G, S, D, P = 1 + case % 3, (1, 2)[case % 2], (1, 4)[(case // 2) % 2], (1, 33)[case % 2], (64, 24)[case % 2], 7
    H = Hkv * G

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rnd(B, 1, H, D).transpose(1, 2)
    cache = rnd(2, B, Hkv, S + 3, D)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    kind = case % 4
    if kind == 0:
        mask = None
    elif kind == 1:
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[0] = False  # a fully padded row still sees the prefix
    elif kind == 2:
        mask = torch.zeros(B, 1, 1, S, dtype=dtype)
        mask[..., 0] = float("-inf")
    else:
        mask = rnd(B, H, 1, S)
    with torch.no_grad():
        out = prefix_decode_step(q, k, v, pk, pv, mask, None)
    assert out is not None, "the decode entry refused a decode step"
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=False, attn_mask=ref_mask)
    assert out.dtype == dtype and out.shape == (B, H, 1, D)
    assert _rel(out, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_decode_step_entry_declines_what_it_does_not_cover():
    """None (the caller runs prefix_attention) for several queries, autograd, a batch prefix,
    a 2-D mask, a forced or named backend."""
    from ptpeft_fast.ops import prefix_decode_step, use_backend

    q, k, v, pk, pv, _ = _inputs(2, 4, 2, 1, 9, 3, 16)
    with torch.no_grad():
        assert prefix_decode_step(q, k, v, pk, pv, None, None) is not None
        q2, k2, v2, _, _, _ = _inputs(2, 4, 2, 2, 9, 3, 16)
        assert prefix_decode_step(q2, k2, v2, pk, pv, None, None) is None  # L = 2
        assert prefix_decode_step(q, k, v, pk.expand(2, *pk.shape), pv.expand(2, *pv.shape), None, None) is None
        assert prefix_decode_step(q, k, v, pk, pv, torch.ones(1, 9, dtype=torch.bool), None) is None
        assert prefix_decode_step(q, k, v, pk, pv, None, None, backend="torch") is None
        with use_backend("torch"):
            assert prefix_decode_step(q, k, v, pk, pv, None, None) is None
    assert prefix_decode_step(q, k, v, pk.requires_grad_(), pv, None, None) is None  # training


def _block_ops_or_skip():
    import importlib

    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (DESIGN §4): {_ext.ext_error()}"
    if _ext.loaded_variant() != "avx512":
        pytest.skip(f"the prefix-block op is registered only in the avx512 variant; this run loaded the "
                    f"{_ext.loaded_variant()} variant, whose ATen path the other tests cover")
    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")
    q = torch.zeros(1, 1, 1, 64)
    ops = pa._prefix_block_ops(q, torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), q)
    assert ops is not None, "prefix_block_forward/backward are not registered"
    return pa, ops


@pytest.mark.parametrize("B,H,Hkv,L,S,P,D,transposed,mask_kind", [
    (2, 4, 2, 37, 37, 1, 64, False, "causal"),
    (3, 8, 2, 20, 29, 17, 128, True, "bool-padding"),
    (1, 4, 4, 16, 16, 64, 64, True, "causal"),
    (2, 6, 3, 5, 12, 33, 64, False, "additive"),
    (2, 2, 1, 70, 70, 48, 128, False, "none"),
], ids=["P1", "gqa-bool-mask-D128", "P64-transformers-layout", "additive-mask", "mqa-no-mask"])
def test_fused_prefix_block_matches_reference(B, H, Hkv, L, S, P, D, transposed, mask_kind, monkeypatch):
    """The training path's prefix block (csrc/prefix_block_cpu.cpp): forward and every gradient
    against the float64 reference, with partial row blocks (L not a multiple of 16 or 4)."""
    pa, ops = _block_ops_or_skip()
    calls = []
    monkeypatch.setattr(pa, "_prefix_block_ops", lambda *a: (calls.append(1), ops)[1])
    monkeypatch.setattr(pa, "_flash_prefix_ops", lambda *a: None)  # the block serves maskless calls without BLAS
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=L + P, transposed=transposed)
    mask, causal = None, False
    if mask_kind == "causal":
        causal = True
    elif mask_kind == "bool-padding":
        mask = torch.ones(B, 1, L, S, dtype=torch.bool).tril(diagonal=S - L)
        mask[0, ..., :5] = False  # left padding of row 0
    elif mask_kind == "additive":
        mask = torch.randn(B, 1, L, S, generator=g)
    _compare(q, k, v, pk, pv, g, causal=causal, attn_mask=mask)
    assert calls, "the fused prefix block was not used"


def test_fused_prefix_block_only_prefix_trains(monkeypatch):
    """Stage 1 (only the prefix needs grad): no dq from the op, prefix grads still exact."""
    pa, ops = _block_ops_or_skip()
    monkeypatch.setattr(pa, "_flash_prefix_ops", lambda *a: None)
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 24, 24, 10, 64, seed=5)
    pkr, pvr = pk.clone().requires_grad_(), pv.clone().requires_grad_()
    out = prefix_attention(q, k, v, pkr, pvr, causal=True, backend="torch")
    go = torch.randn(out.shape, generator=g)
    dpk, dpv = torch.autograd.grad(out, [pkr, pvr], go)
    leaves = [t.double().requires_grad_() for t in (pk, pv)]
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), *leaves, causal=True)
    rpk, rpv = torch.autograd.grad(ref, leaves, go.double())
    assert _rel(out, ref) <= 1e-5 and _rel(dpk, rpk) <= 1e-5 and _rel(dpv, rpv) <= 1e-5


def test_fused_prefix_block_declines_other_shapes():
    import importlib

    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")
    q80, q64 = torch.zeros(1, 1, 1, 80), torch.zeros(1, 1, 1, 64)
    assert pa._prefix_block_ops(q80, torch.zeros(1, 1, 80), torch.zeros(1, 1, 80), q80) is None  # head dim 80
    assert pa._prefix_block_ops(q64, torch.zeros(1, 65, 64), torch.zeros(1, 65, 64), q64) is None  # P > 64
    assert pa._prefix_block_ops(q64, torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 1, 64), q64) is None  # batch prefix
    q64d = q64.double()
    assert pa._prefix_block_ops(q64d, torch.zeros(1, 1, 64).double(), torch.zeros(1, 1, 64).double(), q64d) is None


def _flash_ops_or_fail():
    import importlib

    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (DESIGN §4): {_ext.ext_error()}"
    pa = importlib.import_module("ptpeft_fast.ops.prefix_attention")
    ops = pa._flash_prefix_ops(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 64))
    assert ops is not None, "flash_prefix_forward/backward are unavailable (no BLAS sgemm in torch?)"
    return pa, ops


def _count_flash_calls(monkeypatch, pa, ops) -> list:
    calls = []
    monkeypatch.setattr(pa, "_flash_prefix_ops", lambda *a: (calls.append(1), ops)[1])
    return calls


# (B, H, Hkv, L, S, P, D, transposed, causal): partial 64-row blocks, GQA with tasks per key/value
# head (B·Hkv >= 2 threads) and per query head (summed after), head dims BLAS-only (80, 16), P > 64
@pytest.mark.parametrize("B,H,Hkv,L,S,P,D,transposed,causal", [
    (2, 4, 4, 37, 37, 1, 64, False, True),
    (2, 4, 4, 130, 130, 33, 64, True, True),
    (3, 8, 2, 65, 65, 100, 128, False, True),
    (1, 8, 1, 70, 70, 7, 80, True, True),
    (1, 6, 2, 64, 64, 16, 16, False, True),
    (2, 4, 2, 20, 90, 5, 32, False, False),
    (2, 4, 2, 1, 33, 4, 64, True, True),
], ids=["P1-partial-block", "transformers-layout", "gqa-by-kv-head-P100-D128", "mqa-scratch-D80",
        "gqa-one-block", "cross-S>L", "one-query"])
def test_flash_prefix_matches_reference(B, H, Hkv, L, S, P, D, transposed, causal, monkeypatch):
    """The maskless fp32 path (csrc/prefix_flash_cpu.cpp): forward and every gradient against the
    float64 reference."""
    pa, ops = _flash_ops_or_fail()
    calls = _count_flash_calls(monkeypatch, pa, ops)
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=L + P + D, transposed=transposed)
    _compare(q, k, v, pk, pv, g, causal=causal)
    assert calls, "the flash prefix op was not used"


@pytest.mark.parametrize("wanted", [("prefix_k", "prefix_v"), ("q", "prefix_v"), ("v",)])
def test_flash_prefix_gradient_subsets(wanted, monkeypatch):
    """Only the requested gradients; stage 1 (prefix only) skips the real-key products."""
    pa, ops = _flash_ops_or_fail()
    calls = _count_flash_calls(monkeypatch, pa, ops)
    q, k, v, pk, pv, g = _inputs(2, 6, 3, 70, 70, 9, 64, seed=11)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    leaves = [t.clone().requires_grad_(n in wanted) for n, t in zip(names, (q, k, v, pk, pv))]
    out = prefix_attention(*leaves, causal=True, backend="torch")
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], go)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = prefix_attention_reference(*ref_leaves, causal=True)
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], go.double())
    assert calls and _rel(out, ref) <= 1e-5
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-5


def test_flash_prefix_without_autograd_and_with_expanded_grad(monkeypatch):
    """No-grad calls (evaluation, prefill) take the forward alone; an expanded output gradient
    (``out.sum().backward()``) is made dense before the op."""
    pa, ops = _flash_ops_or_fail()
    calls = _count_flash_calls(monkeypatch, pa, ops)
    q, k, v, pk, pv, _ = _inputs(2, 4, 2, 40, 40, 6, 64, seed=3)
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=True)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    assert calls and _rel(out, ref) <= 1e-5
    pkr = pk.clone().requires_grad_()
    prefix_attention(q, k, v, pkr, pv, causal=True, backend="torch").sum().backward()
    ref_pk = pk.double().requires_grad_()
    prefix_attention_reference(q.double(), k.double(), v.double(), ref_pk, pv.double(), causal=True).sum().backward()
    assert _rel(pkr.grad, ref_pk.grad) <= 1e-5


def test_flash_prefix_declines_what_it_does_not_cover(monkeypatch):
    pa, _ = _flash_ops_or_fail()
    q = torch.zeros(1, 1, 8, 64)
    assert pa._flash_prefix_ops(q.double(), q.double(), torch.zeros(1, 2, 64).double()) is None  # fp64: the ATen path
    assert pa._flash_prefix_ops(q, q, torch.zeros(1, 1, 2, 64)) is None  # per-batch prefix
    assert pa._flash_prefix_ops(q.bfloat16(), q.bfloat16(), torch.zeros(1, 2, 64).bfloat16()) is None
    meta = torch.zeros(1, 1, 8, 64, device="meta")
    assert pa._flash_prefix_ops(meta, meta, torch.zeros(1, 2, 64, device="meta")) is None
    monkeypatch.setattr(pa, "FLASH_PREFIX_MAX_KEYS", 12)
    assert pa._flash_prefix_ops(q, q, torch.zeros(1, 2, 64)) is not None  # P + S = 10 keys
    assert pa._flash_prefix_ops(q[:, :, :1], q, torch.zeros(1, 5, 64)) is None  # P + S = 13 (one query, a long cache)


def test_flash_prefix_op_checks_its_inputs():
    _flash_ops_or_fail()
    op = torch.ops.ptpeft_fast.flash_prefix_forward
    q, k = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8)
    pk = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="causal needs as many queries as keys"):
        op(q, k, k, pk, pk, None, True, 1.0)
    with pytest.raises(RuntimeError, match="prefix_k/v must be"):
        op(q, k, k, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), None, False, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), k.double(), pk.double(), pk.double(), None, False, 1.0)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        op(q, k, k, pk, pk, torch.zeros(1, 1, 3, 5), False, 1.0)
    with pytest.raises(RuntimeError, match="last dim must cover the S real keys"):
        op(q, k, k, pk, pk, torch.zeros(1, 1, 4, 4), False, 1.0)


@pytest.mark.parametrize("mask_kind", ["padding-causal", "padding-only-causal-flag-off", "additive-broadcast",
                                       "additive-expanded", "key-padding-row-mask", "causal-S>L", "fully-padded-row"])
def test_flash_prefix_with_masks(mask_kind, monkeypatch):
    """Masks over the real keys are added to the block's scores: padding (with and without the
    causal skip), broadcast additive masks, bottom-right causal with S > L, and a query row whose
    real keys are all masked (it attends to the prefix only)."""
    pa, ops = _flash_ops_or_fail()
    calls = _count_flash_calls(monkeypatch, pa, ops)
    B, H, Hkv, L, S, P, D = 3, 4, 2, 70, 70, 5, 32
    if mask_kind == "causal-S>L":
        S = 90
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=17, transposed=True)
    causal, mask = True, None
    if mask_kind == "padding-causal":
        mask = _padding_mask(B, L, S, [70, 41, 9], "left", True)
    elif mask_kind == "padding-only-causal-flag-off":
        mask, causal = _padding_mask(B, L, S, [70, 41, 9], "right", False), False
    elif mask_kind == "additive-broadcast":
        mask = torch.randn(1, H, L, S, generator=g)
    elif mask_kind == "additive-expanded":  # stride-0 dims, read in place
        mask = torch.randn(B, 1, 1, S, generator=g).expand(B, H, L, S)
    elif mask_kind == "key-padding-row-mask":
        mask = _padding_mask(B, 1, S, [70, 33, 2], "left", False)  # [B, 1, 1, S]
    elif mask_kind == "fully-padded-row":
        mask = _padding_mask(B, L, S, [70, 41, 9], "left", True)
        mask[1, :, :10] = False  # rows 0-9 of batch 1 see no real key
    _compare(q, k, v, pk, pv, g, causal=causal, attn_mask=mask)
    assert calls, "the flash prefix op was not used"


def test_flash_prefix_masked_keys_weigh_exactly_zero(monkeypatch):
    """Padded keys get probability 0, not a tiny e^-87: values of 1e36 behind the mask must not
    leak into the output or any gradient (a tiny weight would also make the GEMMs run on
    denormal floats, ≈ 14x slower)."""
    pa, ops = _flash_ops_or_fail()
    calls = _count_flash_calls(monkeypatch, pa, ops)
    B, H, L, P, D = 2, 2, 40, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=29)
    mask = _padding_mask(B, L, L, [40, 25], "left", True)
    v = v.clone()
    v[1, :, :15] = 1e36  # the padded keys of row 1
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=mask)
    assert calls


def test_decode_step_masked_keys_weigh_exactly_zero():
    """The decode op gives padded cache entries weight 0: values of 1e36 behind the mask stay out
    (a clamped e^-87 weight let them in at 1e-38 of their size, and its products were denormal)."""
    from ptpeft_fast import _ext
    from ptpeft_fast.ops import prefix_decode_step

    assert _ext.load_ext(), f"the csrc extension must build here (DESIGN §4): {_ext.ext_error()}"
    q, k, v, pk, pv, _ = _inputs(2, 4, 2, 1, 20, 3, 32, seed=31)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :7] = False  # left padding of row 1
    v = v.clone()
    v[1, :, :7] = 1e36
    with torch.no_grad():
        out = prefix_decode_step(q, k, v, pk, pv, mask, None)
    assert out is not None
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=False, attn_mask=mask)
    assert _rel(out, ref) <= 1e-5
