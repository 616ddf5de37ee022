"""prefix_attention: every CPU implementation of its dispatch table (block_cpp, lse_merge, chunked,
decode_cpp, and the torch reference) against the float64 concatenation reference (design §2, §5).

Each comparison runs every implementation that the table says applies to the call, chosen through
the public switch (``backend=<name>``), forward and every gradient; the Triton kernel has its own
file (tests/test_triton_prefix_attention.py)."""
from __future__ import annotations

import math

import pytest
import torch
from _oracles import prefix_attention_reference
from torch.utils._python_dispatch import TorchDispatchMode

from ptpeft_fast.ops import explain, prefix_attention, use_backend

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
CPU_IMPLS = ("block_cpp", "lse_merge", "chunked", "torch")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    return ((out - ref).norm() / ref.norm()).item()


def _runs(impl: str, *tensors, **kw) -> bool:
    """The table lets ``impl`` run this call (``explain`` with the name asked for)."""
    return explain(prefix_attention, *tensors, backend=impl, **kw).chosen == impl


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


def _compare(q, k, v, pk, pv, g, *, causal, attn_mask=None, scale=None, tol=None, check_mask_grad=False,
             impls=CPU_IMPLS, expect=()):
    """Forward and every gradient of each implementation in ``impls`` that applies, vs the float64
    reference on the same inputs. Returns the reference-path output; the implementations that ran
    must include the one ``"auto"`` picks, the reference and every name in ``expect``."""
    dtype = q.dtype
    tol = TOL[dtype] if tol is None else tol
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref_mask = None
    if attn_mask is not None:
        ref_mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.detach().double()
        if check_mask_grad:
            ref_mask = ref_mask.requires_grad_()
            ref_leaves.append(ref_mask)
    ref = prefix_attention_reference(*ref_leaves[:5], causal=causal, attn_mask=ref_mask, scale=scale)
    assert torch.isfinite(ref).all()
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go)
    ran, outs = [], {}
    names = ["q", "k", "v", "prefix_k", "prefix_v", "attn_mask"]
    for impl in impls:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
        mask = attn_mask
        if check_mask_grad:
            mask = attn_mask.detach().clone().requires_grad_()
            leaves.append(mask)
        if not _runs(impl, *leaves[:5], causal=causal, attn_mask=mask, scale=scale):
            continue
        out = prefix_attention(*leaves[:5], causal=causal, attn_mask=mask, scale=scale, backend=impl)
        assert out.dtype == dtype and out.shape == q.shape, impl
        grads = torch.autograd.grad(out, leaves, go.to(dtype))
        assert _rel(out, ref) <= tol, f"{impl}: rel err {_rel(out, ref):.2e} > {tol}"
        for name, gr, rg in zip(names, grads, ref_grads, strict=False):
            assert gr.shape == rg.shape, (impl, name)
            assert _rel(gr, rg) <= tol, f"{impl}: grad of {name}: rel err {_rel(gr, rg):.2e} > {tol}"
        ran.append(impl)
        outs[impl] = out
    leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    mask = attn_mask.detach().requires_grad_() if check_mask_grad else attn_mask
    auto = explain(prefix_attention, *leaves, causal=causal, attn_mask=mask, scale=scale).chosen
    want = {auto, "torch", *expect} & set(impls) if auto in impls else {"torch", *expect}
    assert want <= set(ran), f"ran {ran}, expected at least {sorted(want)}"
    return outs["torch"]


def _compare_no_grad(q, k, v, pk, pv, *, causal, attn_mask=None, tol=None,
                     impls=("decode_cpp",) + CPU_IMPLS, expect=()):
    """Forward only (evaluation, ``generate``): each implementation that applies vs the reference."""
    tol = TOL[q.dtype] if tol is None else tol
    ref_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=causal, attn_mask=ref_mask)
    ran = []
    with torch.no_grad():
        for impl in impls:
            if not _runs(impl, q, k, v, pk, pv, causal=causal, attn_mask=attn_mask):
                continue
            out = prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=attn_mask, backend=impl)
            assert out.dtype == q.dtype and out.shape == q.shape, impl
            assert _rel(out, ref) <= tol, f"{impl}: rel err {_rel(out, ref):.2e}"
            ran.append(impl)
    assert set(expect) <= set(ran) and "torch" in ran, ran
    return ran


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
    for gr, rg, leaf in zip(grads, ref_grads, (q, k, v, pk, pv), strict=True):
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
@pytest.mark.parametrize("impl", ["lse_merge", "chunked", "torch"])
def test_gradcheck_float64(shape, shared, mask_kind, impl):
    B, H, Hkv, L, S, P, D, causal = shape
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, shared=shared, dtype=torch.float64, seed=13)
    mask = None
    if mask_kind == "pad":
        mask = _padding_mask(B, L, S, [3, 1], "left", causal)
    elif mask_kind == "float":
        mask = torch.randn(B, H, L, S, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]

    def fn(*xs):
        return prefix_attention(*xs, causal=causal, attn_mask=mask, backend=impl)

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
    for gr, rg in zip(grads, ref_grads, strict=True):
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


def test_chunked_dropout_equals_reference_with_its_keep_masks():
    """The chunked path's dropout (CUDA's fallback; seeded, regenerated in the backward): forward and
    every gradient equal the float64 reference run with the same keep-masks, chunk by chunk."""
    from ptpeft_fast.ops import attention_chunked as ch

    B, H, Hkv, L, P, D, p = 2, 4, 2, 9, 3, 8, 0.3
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, L, P, D, seed=19)
    mask = _padding_mask(B, L, L, [9, 5], "left", True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    seed = torch.tensor([1234])
    scale = 1 / math.sqrt(D)
    out, _ = torch.ops.ptpeft_fast.prefix_attention_forward(*leaves, mask, None, seed, True, scale, p, "chunked")
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, go)
    # the same masks, drawn as the op draws them (one chunk here), for the reference in float64
    keep = ch.dropout_keep(1234, 0, (B, Hkv, (H // Hkv) * L, P + L), p, q.device).view(B, H, L, P + L)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = _reference_with_keep(*ref_leaves, mask, keep, p, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    assert _rel(out, ref) <= 1e-5
    for gr, rg in zip(grads, ref_grads, strict=True):
        assert _rel(gr, rg) <= 1e-5
    again, _ = torch.ops.ptpeft_fast.prefix_attention_forward(q, k, v, pk, pv, mask, None, seed, True, scale, p,
                                                              "chunked")
    assert torch.equal(again, out.detach())  # the seed fixes the masks


def _reference_with_keep(q, k, v, pk, pv, mask, keep, p, scale):
    B, H, L, D = q.shape
    G = H // k.shape[1]
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(G, 1)
    vals = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(G, 1)
    s = q @ keys.transpose(-1, -2) * scale
    P = pk.shape[-2]
    s = torch.cat([s[..., :P], s[..., P:].masked_fill(~mask, float("-inf"))], -1)
    return (torch.softmax(s, -1) * keep / (1 - p)) @ vals


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


@pytest.mark.parametrize("impl,use_mask,dropout_p", [("lse_merge", False, 0.0), ("lse_merge", True, 0.0),
                                                     ("torch", True, 0.2), ("block_cpp", True, 0.0)],
                         ids=["lse-merge-causal", "lse-merge-padding-mask", "reference-dropout", "block-cpp"])
def test_never_expands_prefix_nor_builds_full_mask(impl, use_mask, dropout_p):
    """No op (forward or backward, inside the implementation too) outputs a batch-expanded prefix or
    a [.., P+S] tensor. The implementations' functions run under the recording mode directly: the
    torch.library ops are one opaque call to it."""
    from ptpeft_fast.ops import attention_cpu as cpu
    from ptpeft_fast.ops.attention_reference import reference_attention

    B, H, Hkv, L, S, P, D = 3, 4, 2, 5, 7, 11, 16  # distinctive sizes
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=18)
    mask = _padding_mask(B, L, S, [7, 4, 2], "left", True) if use_mask else None
    go = torch.randn(B, H, L, D, generator=g)
    scale = 1 / math.sqrt(D)
    with _RecordShapes() as rec:
        if impl == "torch":
            leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
            reference_attention(*leaves, mask, True, scale, dropout_p).backward(go)
            dpk = pk.grad
        else:
            fwd, bwd = {"lse_merge": (cpu.lse_merge_forward, cpu.lse_merge_backward),
                        "block_cpp": (cpu.block_forward, cpu.block_backward)}[impl]
            out, lse = fwd(q, k, v, pk, pv, mask, True, scale)
            extra = [True] * 5 if impl == "lse_merge" else True
            dpk = bwd(go, q, k, v, pk, pv, mask, out, lse, True, scale, extra)[3]
    assert rec.shapes, "nothing recorded"
    for func, shape in rec.shapes:
        assert P + S not in shape, f"{func} built a tensor over P+S keys: {shape}"
        assert not (shape[-2:] == (P, D) and math.prod(shape) >= B * Hkv * P * D), (
            f"{func} expanded the prefix over the batch: {shape}"
        )
    assert dpk.shape == (Hkv, P, D) and torch.isfinite(dpk).all()


# ---------------------------------------------------------------- backend and validation


def test_backend_selection_and_explain():
    from ptpeft_fast.ops import BackendUnsupported

    q, k, v, pk, pv, g = _inputs(2, 4, 2, 4, 4, 2, 8, seed=19)
    a = prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    with use_backend("torch"):
        b = prefix_attention(q, k, v, pk, pv, causal=True)
        assert explain(prefix_attention, q, k, v, pk, pv, causal=True).chosen == "torch"
    assert torch.equal(a, b)
    with use_backend("lse_merge"), torch.no_grad():
        assert explain(prefix_attention, q, k, v, pk, pv, causal=True).chosen == "lse_merge"
    with pytest.raises(BackendUnsupported, match="xformers.*CUDA only"):
        prefix_attention(q, k, v, pk, pv, causal=True, backend="xformers")
    with pytest.raises(ValueError, match="not one of"):
        prefix_attention(q, k, v, pk, pv, causal=True, backend="cuda-magic")
    with pytest.raises(ValueError, match="not an implementation of any op"):
        with use_backend("cuda-magic"):
            pass
    e = explain(prefix_attention, q, k, v, pk.requires_grad_(), pv, causal=True)  # training: no decode_cpp
    assert e.chosen == "block_cpp" and "autograd" in e.declined["decode_cpp"] and e.declined["torch"]
    assert "block_cpp runs" in str(e)
    with torch.no_grad():
        assert explain(prefix_attention, q, k, v, pk, pv, causal=True).chosen == "decode_cpp"  # 4 queries per row


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
    go = torch.randn(q.shape, generator=g)
    ref_pk, ref_pv = pk.double().requires_grad_(), pv.double().requires_grad_()
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), ref_pk, ref_pv, causal=True, attn_mask=mask)
    ref.backward(go.double())
    ran = []
    for impl in CPU_IMPLS:
        pk1, pv1 = pk.clone().requires_grad_(), pv.clone().requires_grad_()
        if not _runs(impl, q, k, v, pk1, pv1, causal=True, attn_mask=mask):
            continue
        out = prefix_attention(q, k, v, pk1, pv1, causal=True, attn_mask=mask, backend=impl)
        out.backward(go)
        assert _rel(out.detach(), ref.detach()) <= 1e-5, impl
        assert _rel(pk1.grad, ref_pk.grad) <= 1e-5 and _rel(pv1.grad, ref_pv.grad) <= 1e-5, impl
        ran.append(impl)
    assert {"lse_merge", "chunked", "torch"} <= set(ran) and ("block_cpp" in ran) == shared


def test_causal_padding_mask_uses_kernel_causal_skip():
    """A bool mask with nothing above the diagonal lets the CPU kernels run with their causal flag
    on (they skip the keys above the diagonal); the result is the same (compared on every path)."""
    from ptpeft_fast.ops.attention_cpu import kernel_causal

    B, H, L, P, D = 2, 4, 6, 2, 8
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=23)
    causal_pad = _padding_mask(B, L, L, [6, 3], "left", True)
    pad_only = _padding_mask(B, L, L, [6, 3], "left", False)
    assert kernel_causal(causal_pad, True, L, L) and not kernel_causal(pad_only, False, L, L)
    assert kernel_causal(None, True, L, L) and not kernel_causal(None, True, L, L + 3)  # top-left aligned: S == L only
    assert not kernel_causal(torch.zeros(B, 1, L, L), True, L, L)  # a float mask is taken as it is
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=causal_pad, expect=("block_cpp", "lse_merge"))
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=pad_only, expect=("block_cpp", "lse_merge"))


def test_non_cpu_tensors_take_the_device_agnostic_path():
    """The fused kernel is CPU-only; other devices (meta here) must still get a result."""
    q, k, v, pk, pv, g = _inputs(2, 4, 2, 5, 6, 3, 8)
    meta = [t.to("meta") for t in (q, k, v, pk, pv)]
    out = prefix_attention(*meta, causal=True, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape


@pytest.mark.parametrize("case", range(12))
def test_no_grad_paths_match_reference(case):
    """Without autograd (eval, generate) every implementation that applies, decode_cpp included."""
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
    _compare_no_grad(q, k, v, pk, pv, causal=causal, attn_mask=mask,
                     expect=("decode_cpp", "block_cpp", "lse_merge", "chunked"))


@pytest.mark.parametrize("case", range(16))
def test_decode_op_matches_reference(case):
    """No-grad calls with at most DECODE_MAX_QUERIES queries take the one-pass C++ op
    (csrc/decode_attention_cpu.cpp): float64 reference, GQA, masks of every accepted
    form, strided caches, fp32 and fp64, sizes that split across threads."""
    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"

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
    assert explain(prefix_attention, q, k, v, pk, pv, causal=causal, attn_mask=mask).chosen == "decode_cpp"
    _compare_no_grad(q, k, v, pk, pv, causal=causal, attn_mask=mask, expect=("decode_cpp",))


def test_decode_op_is_not_used_with_autograd_or_many_queries():
    from ptpeft_fast.ops.prefix_attention import DECODE_MAX_QUERIES

    q, k, v, pk, pv, g = _inputs(2, 4, 2, 1, 9, 3, 16)
    e = explain(prefix_attention, q, k, v, pk.requires_grad_(), pv, causal=True)  # training: autograd
    assert e.chosen != "decode_cpp" and "autograd" in e.declined["decode_cpp"]
    q, k, v, pk, pv, g = _inputs(2, 4, 2, DECODE_MAX_QUERIES + 1, 20, 3, 16)
    with torch.no_grad():  # prefill
        e = explain(prefix_attention, q, k, v, pk, pv, causal=True)
    assert e.chosen != "decode_cpp" and "queries per row" in e.declined["decode_cpp"]


@pytest.mark.parametrize("case", range(8))
def test_decode_step_entry_matches_reference(case):
    """ops.prefix_decode_step (the attention function's unchecked decode entry) equals the
    float64 reference for one query per row: masks None / bool with a fully padded row /
    additive with -inf / per head, GQA, fp32 and fp64, strided caches."""
    from ptpeft_fast import _ext
    from ptpeft_fast.ops import prefix_decode_step

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"
    g = torch.Generator().manual_seed(900 + case)
    dtype = torch.float64 if case % 3 == 2 else torch.float32
    B, Hkv, G = 1 + case % 3, (1, 2)[case % 2], (1, 4)[(case // 2) % 2]
    S, D, P = (1, 33)[case % 2], (64, 24)[case % 2], 7
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
    """None (the caller runs prefix_attention) for more queries than the table's decode entry
    takes, autograd, a batch prefix, a 2-D mask, a forced or named backend."""
    from ptpeft_fast.ops import prefix_decode_step, use_backend

    q, k, v, pk, pv, _ = _inputs(2, 4, 2, 1, 9, 3, 16)
    with torch.no_grad():
        assert prefix_decode_step(q, k, v, pk, pv, None, None) is not None
        q9, k9, v9, _, _, _ = _inputs(2, 4, 2, 9, 9, 3, 16)
        assert prefix_decode_step(q9, k9, v9, pk, pv, None, None) is None  # L = 9 > DECODE_MAX_QUERIES
        assert prefix_decode_step(q, k, v, pk.expand(2, *pk.shape), pv.expand(2, *pv.shape), None, None) is None
        assert prefix_decode_step(q, k, v, pk, pv, torch.ones(1, 9, dtype=torch.bool), None) is None
        assert prefix_decode_step(q, k, v, pk, pv, None, None, backend="torch") is None
        with use_backend("torch"):
            assert prefix_decode_step(q, k, v, pk, pv, None, None) is None
    assert prefix_decode_step(q, k, v, pk.requires_grad_(), pv, None, None) is None  # training


def _block_cpp_or_fail():
    from ptpeft_fast import _ext

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"
    q = torch.zeros(1, 1, 4, 64)
    e = explain(prefix_attention, q, q, q, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), causal=True,
                backend="block_cpp")
    assert e.chosen == "block_cpp", f"block_cpp is unavailable (no BLAS sgemm in torch?): {e}"


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
def test_flash_prefix_matches_reference(B, H, Hkv, L, S, P, D, transposed, causal):
    """block_cpp (csrc/prefix_flash_cpu.cpp): forward and every gradient against the float64
    reference (and every other path that applies)."""
    _block_cpp_or_fail()
    q, k, v, pk, pv, g = _inputs(B, H, Hkv, L, S, P, D, seed=L + P + D, transposed=transposed)
    _compare(q, k, v, pk, pv, g, causal=causal, expect=("block_cpp",))


@pytest.mark.parametrize("wanted", [("prefix_k", "prefix_v"), ("q", "prefix_v"), ("v",)])
@pytest.mark.parametrize("impl", ["block_cpp", "lse_merge", "chunked"])
def test_gradient_subsets(wanted, impl):
    """Only the requested gradients; stage 1 (prefix only) skips the real-key products."""
    _block_cpp_or_fail()
    q, k, v, pk, pv, g = _inputs(2, 6, 3, 70, 70, 9, 64, seed=11)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    leaves = [t.clone().requires_grad_(n in wanted) for n, t in zip(names, (q, k, v, pk, pv), strict=True)]
    out = prefix_attention(*leaves, causal=True, backend=impl)
    go = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], go)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = prefix_attention_reference(*ref_leaves, causal=True)
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], go.double())
    assert _rel(out, ref) <= 1e-5
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize("impl", ["block_cpp", "lse_merge", "chunked"])
def test_without_autograd_and_with_expanded_grad(impl):
    """No-grad calls (evaluation, prefill) take the forward alone; an expanded output gradient
    (``out.sum().backward()``) is made dense before the kernels read it."""
    _block_cpp_or_fail()
    q, k, v, pk, pv, _ = _inputs(2, 4, 2, 40, 40, 6, 64, seed=3)
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=True)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, causal=True, backend=impl)
    assert _rel(out, ref) <= 1e-5
    pkr = pk.clone().requires_grad_()
    prefix_attention(q, k, v, pkr, pv, causal=True, backend=impl).sum().backward()
    ref_pk = pk.double().requires_grad_()
    prefix_attention_reference(q.double(), k.double(), v.double(), ref_pk, pv.double(), causal=True).sum().backward()
    assert _rel(pkr.grad, ref_pk.grad) <= 1e-5


def test_block_cpp_declines_what_it_does_not_cover():
    from ptpeft_fast.ops.prefix_attention import FLASH_PREFIX_MAX_KEYS

    _block_cpp_or_fail()
    q, pk = torch.zeros(1, 1, 8, 64), torch.zeros(1, 2, 64)

    def reason(q, k, pk):
        return explain(prefix_attention, q, k, k, pk, pk, causal=False, backend="block_cpp").declined.get("block_cpp")

    assert "fp32 only" in reason(q.double(), q.double(), pk.double())
    assert "per-sample prefix" in reason(q, q, torch.zeros(1, 1, 2, 64))
    assert "fp32 only" in reason(q.bfloat16(), q.bfloat16(), pk.bfloat16())
    meta = torch.zeros(1, 1, 8, 64, device="meta")
    assert "CPU only" in reason(meta, meta, torch.zeros(1, 2, 64, device="meta"))
    long = torch.zeros(1, 1, FLASH_PREFIX_MAX_KEYS - 1, 64)
    assert reason(q, long, pk) is None  # it runs there when asked for, but auto leaves long keys to lse_merge
    assert "keys >" in explain(prefix_attention, q, long, long, pk, pk, causal=False).declined["block_cpp"]
    q9 = torch.zeros(1, 1, 9, 64, dtype=torch.float64)  # more queries than decode_cpp takes
    with torch.no_grad():  # auto takes the general path there
        assert explain(prefix_attention, q9, q9, q9, pk.double(), pk.double(), causal=False).chosen == "lse_merge"


def test_flash_prefix_op_checks_its_inputs():
    _block_cpp_or_fail()
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
def test_flash_prefix_with_masks(mask_kind):
    """Masks over the real keys are added to the block's scores: padding (with and without the
    causal skip), broadcast additive masks, bottom-right causal with S > L, and a query row whose
    real keys are all masked (it attends to the prefix only)."""
    _block_cpp_or_fail()
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
    _compare(q, k, v, pk, pv, g, causal=causal, attn_mask=mask, expect=("block_cpp", "lse_merge", "chunked"))


def test_masked_keys_weigh_exactly_zero():
    """Padded keys get probability 0, not a tiny e^-87: values of 1e36 behind the mask must not
    leak into the output or any gradient (a tiny weight would also make the GEMMs run on
    denormal floats, ≈ 14x slower)."""
    _block_cpp_or_fail()
    B, H, L, P, D = 2, 2, 40, 3, 16
    q, k, v, pk, pv, g = _inputs(B, H, H, L, L, P, D, seed=29)
    mask = _padding_mask(B, L, L, [40, 25], "left", True)
    v = v.clone()
    v[1, :, :15] = 1e36  # the padded keys of row 1
    _compare(q, k, v, pk, pv, g, causal=True, attn_mask=mask, expect=("block_cpp", "lse_merge", "chunked"))


def test_decode_step_masked_keys_weigh_exactly_zero():
    """The decode op gives padded cache entries weight 0: values of 1e36 behind the mask stay out
    (a clamped e^-87 weight let them in at 1e-38 of their size, and its products were denormal)."""
    from ptpeft_fast import _ext
    from ptpeft_fast.ops import prefix_decode_step

    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"
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


@pytest.mark.parametrize("L,causal", [(2, True), (5, True), (8, True), (4, False)])
def test_decode_step_entry_takes_what_the_table_takes(L, causal):
    """Several queries per row (assisted generation's drafts), as many as the table's decode_cpp
    entry allows: the same result as the float64 reference, bottom-right causal or not."""
    from ptpeft_fast import _ext
    from ptpeft_fast.ops import explain, prefix_attention, prefix_decode_step
    from ptpeft_fast.ops.prefix_attention import DECODE_MAX_QUERIES

    assert _ext.load_ext(), _ext.ext_error()
    assert L <= DECODE_MAX_QUERIES
    q, k, v, pk, pv, _ = _inputs(2, 4, 2, L, 11, 3, 16)
    with torch.no_grad():
        out = prefix_decode_step(q, k, v, pk, pv, None, None, causal=causal)
        assert explain(prefix_attention, q, k, v, pk, pv, causal=causal).chosen == "decode_cpp"
    assert out is not None
    ref = prefix_attention_reference(*(t.double() for t in (q, k, v, pk, pv)), causal=causal)
    assert _rel(out, ref) <= 1e-5
