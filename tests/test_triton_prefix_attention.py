"""Triton prefix flash-attention against the torch path in float64: in the interpreter on CPU tensors,
or compiled on CUDA tensors when the interpreter is off on a CUDA machine (triton_test_utils.DEVICE).

Every case checks the output and the gradients of q, k, v, prefix_k, prefix_v, with kernel
outputs poisoned (NaN) before each launch so that an unwritten element fails.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from _oracles import prefix_attention_reference  # noqa: E402

from ptpeft_fast.ops import (
    prefix_attention,  # noqa: E402
    triton_ops,  # noqa: E402
)

from triton_test_utils import (  # noqa: E402,F401
    DEVICE,
    TOL,
    dev,
    fast_interpreter,
    gpu_only,
    needs_triton_device,
    rel_err,
    triton_prefix_attention,
)

pytestmark = needs_triton_device

N_RANDOM = 52


def _make(B, H, Hkv, L, S, P, D, dtype, shared, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return dev(torch.randn(*shape, generator=g).to(dtype)).requires_grad_()

    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    return r(B, H, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(*pshape), r(*pshape)


def _padding_mask(B, L, S, lo, hi, causal: bool) -> torch.Tensor:
    """bool [B,1,L,S]: keys [lo_b, hi_b) visible, optionally bottom-right causal (HF layout)."""
    j = torch.arange(S)
    keys = (j[None, :] >= torch.tensor(lo)[:, None]) & (j[None, :] < torch.tensor(hi)[:, None])
    m = keys[:, None, None, :].expand(B, 1, L, S)
    if causal:
        m = m & (j[None, :] <= torch.arange(L)[:, None] + (S - L))
    return dev(m.contiguous())


def _check(inputs, *, causal, attn_mask=None, scale=None, dtype):
    q, k, v, pk, pv = inputs
    with triton_ops.poison_outputs():
        out = prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=attn_mask, scale=scale, backend="triton")
        dout = dev(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
        grads = torch.autograd.grad(out, inputs, dout)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = prefix_attention(*ref_in, causal=causal, attn_mask=attn_mask, scale=scale, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    tol = TOL[dtype]
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, a, b in zip(names, (out,) + grads, (ref,) + ref_grads, strict=True):
        assert a.shape == b.shape and a.dtype == dtype, name
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def _random_cases():
    rng = random.Random(20261122)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    cases = []
    for i in range(N_RANDOM):
        Hkv = rng.choice([1, 2])
        group = rng.choice([1, 1, 2, 4])
        B = rng.choice([1, 2])
        D = rng.choice([16, 32, 32, 64, 80, 96, 128])
        L = rng.choice([1, rng.randint(2, 24), rng.randint(25, 48)])
        self_attn = rng.random() < 0.5
        S = L if self_attn else rng.randint(1, 70)
        P = rng.choice([1, rng.randint(2, 12), rng.randint(13, 40)])
        mask = rng.choice(["none", "none", "pad_right", "pad_left", "float", "all_but_one"])
        causal = rng.random() < 0.6
        shared = rng.random() < 0.5
        # An explicit scale too, kept near 1/sqrt(D): far peakier logits with a handful of keys
        # amplify bf16's FA2-standard delta = rowsum(dO * O) from the bf16-rounded O.
        scale = rng.choice([None, None, 0.7 / math.sqrt(D)])
        cases.append(pytest.param(B, Hkv * group, Hkv, L, S, P, D, causal, mask, shared, scale, dtypes[i % 3], i,
                                  id=f"c{i}-{dtypes[i % 3]}".replace("torch.", "")))
    return cases


@pytest.mark.parametrize("B,H,Hkv,L,S,P,D,causal,mask,shared,scale,dtype,seed", _random_cases())
def test_random_cases(B, H, Hkv, L, S, P, D, causal, mask, shared, scale, dtype, seed):
    inputs = _make(B, H, Hkv, L, S, P, D, dtype, shared, seed)
    rng = random.Random(seed)
    attn_mask = None
    if mask != "none":
        lo, hi = [], []
        for _ in range(B):
            if mask == "pad_right":
                lo.append(0), hi.append(rng.randint(1, S))
            elif mask == "pad_left":
                lo.append(rng.randint(0, S - 1)), hi.append(S)
            elif mask == "all_but_one":
                j = rng.randint(0, S - 1)
                lo.append(j), hi.append(j + 1)
            else:
                a = rng.randint(0, S - 1)
                lo.append(a), hi.append(rng.randint(a + 1, S))
        attn_mask = _padding_mask(B, L, S, lo, hi, causal)
        if mask == "float":
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=DEVICE).masked_fill(~attn_mask,
                                                                                             torch.finfo(dtype).min)
    _check(inputs, causal=causal, attn_mask=attn_mask, scale=scale, dtype=dtype)


# ------------------------------------------------------------------ named edge cases

EDGE = {
    # name: (B, H, Hkv, L, S, P, D, causal, shared)
    "P1": (2, 2, 2, 9, 9, 1, 32, True, True),
    "L1_decode": (2, 4, 2, 1, 45, 6, 64, True, False),
    "S_not_multiple_of_block": (1, 2, 1, 40, 33, 3, 32, True, True),
    "S_gt_L_cross": (2, 2, 2, 7, 50, 5, 32, False, False),
    "L_gt_S": (1, 2, 2, 40, 9, 4, 32, True, True),
    "gqa_8to1": (1, 8, 1, 17, 17, 5, 32, True, True),
    "head_dim_80": (2, 2, 1, 20, 20, 7, 80, True, False),
    "head_dim_96": (1, 2, 2, 12, 12, 3, 96, False, True),
    "head_dim_128": (1, 2, 2, 12, 30, 3, 128, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(EDGE))
def test_edge_cases(name, dtype):
    B, H, Hkv, L, S, P, D, causal, shared = EDGE[name]
    _check(_make(B, H, Hkv, L, S, P, D, dtype, shared, hash(name) % 1000), causal=causal, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_all_but_one_key_padded_left_and_right(causal):
    B, H, L, S, P, D = 2, 2, 12, 12, 3, 32
    inputs = _make(B, H, H, L, S, P, D, torch.float32, True, 3)
    mask = _padding_mask(B, L, S, [S - 1, 0], [S, 1], causal)  # row 0 left-padded, row 1 right-padded
    _check(inputs, causal=causal, attn_mask=mask, dtype=torch.float32)
    # and the oracle agrees on the same mask
    q, k, v, pk, pv = (t.detach().double() for t in inputs)
    ref = prefix_attention_reference(q, k, v, pk, pv, causal=causal, attn_mask=mask)
    out = triton_prefix_attention(*(t.detach() for t in inputs), causal=causal, attn_mask=mask)
    assert rel_err(out, ref) <= 1e-5


def test_shared_prefix_gradient_is_summed_over_batch_deterministically():
    """Batch-shared prefix: dPrefix sums B contributions in-kernel, bitwise repeatable (no atomics)."""
    B, H, L, S, P, D = 4, 2, 10, 10, 5, 32
    inputs = _make(B, H, 1, L, S, P, D, torch.float32, True, 11)
    _check(inputs, causal=True, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = triton_prefix_attention(*inputs, causal=True)
        runs.append(torch.autograd.grad(out.sum(), inputs[3:]))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    # equal to the sum of per-sequence gradients of a per-batch copy of the prefix
    per = [t.detach().expand(B, *t.shape).clone().requires_grad_() for t in inputs[3:]]
    out = triton_prefix_attention(*inputs[:3], *per, causal=True)
    gp = torch.autograd.grad(out.sum(), per)
    for shared_g, per_g in zip(runs[0], gp, strict=True):
        assert rel_err(shared_g, per_g.sum(0).double()) <= 1e-5


def test_mask_conversion_and_refusals():
    B, L, S = 2, 5, 7
    causal_pad = _padding_mask(B, L, S, [2, 0], [7, 6], True)
    klo, khi, causal = triton_ops.mask_to_key_range(causal_pad, B, 4, L, S)
    assert causal and klo.tolist() == [2, 0] and khi.tolist() == [7, 6]
    klo, khi, causal = triton_ops.mask_to_key_range(_padding_mask(B, L, S, [0, 1], [7, 3], False), B, 4, L, S)
    assert not causal and klo.tolist() == [0, 1] and khi.tolist() == [7, 3]
    # a 2-D causal mask broadcasts
    _, _, causal = triton_ops.mask_to_key_range(torch.ones(L, S, dtype=torch.bool).tril(S - L), B, 4, L, S)
    assert causal
    # masks the kernel cannot take are refused by the conversion (the dispatch table then declines
    # Triton and chunked runs them: tests/test_backend_fallback.py)
    window = torch.ones(L, S, dtype=torch.bool).tril(S - L).triu(S - L - 1)  # sliding window
    with pytest.raises(ValueError, match="key padding"):
        triton_ops.mask_to_key_range(window, B, 4, L, S)
    with pytest.raises(ValueError, match="additive float"):
        triton_ops.mask_to_key_range(torch.randn(L, S), B, 4, L, S)  # ALiBi-like additive bias
    holes = causal_pad.clone()
    holes[0, :, :, 4] = False  # two runs of keys in one sequence
    with pytest.raises(ValueError):
        triton_ops.mask_to_key_range(holes, B, 4, L, S)
    inputs = _make(B, 2, 2, L, S, 2, 16, torch.float32, True, 0)
    with pytest.raises(ValueError, match="requires grad"):
        triton_prefix_attention(*inputs, causal=True, attn_mask=torch.zeros(L, S, device=DEVICE, requires_grad=True))


def test_mask_result_is_cached_per_tensor_version():
    B, L, S = 1, 4, 4
    m = _padding_mask(B, L, S, [1], [4], True)
    a = triton_ops._key_range(m, B, 2, L, S)
    assert triton_ops._key_range(m, B, 2, L, S) is a
    m[0, 0, :, 1] = False  # in-place edit bumps the version: recomputed
    b = triton_ops._key_range(m, B, 2, L, S)
    assert b is not a and b[0].tolist() == [2]


def test_strided_inputs_like_hf_transpose():
    """q/k/v as [B,L,H,D] memory viewed as [B,H,L,D] (what HF attention hands over)."""
    B, H, L, D, P = 2, 2, 19, 32, 4
    g = torch.Generator().manual_seed(5)
    q = dev(torch.randn(B, L, H, D, generator=g)).transpose(1, 2).requires_grad_()
    k = dev(torch.randn(B, L, H, D, generator=g)).transpose(1, 2).requires_grad_()
    v = dev(torch.randn(B, L, H, D, generator=g)).transpose(1, 2).requires_grad_()
    pk = dev(torch.randn(H, P, D, generator=g)).requires_grad_()
    pv = dev(torch.randn(H, P, D, generator=g)).requires_grad_()
    _check((q, k, v, pk, pv), causal=True, dtype=torch.float32)


def test_scale_default_is_inverse_sqrt_head_dim():
    inputs = _make(1, 2, 2, 6, 6, 2, 32, torch.float32, True, 1)
    a = triton_prefix_attention(*inputs, causal=False)
    b = triton_prefix_attention(*inputs, causal=False, scale=1 / math.sqrt(32))
    assert torch.equal(a, b)


def _dropout_reference(q, k, v, pk, pv, *, causal, attn_mask, scale, keep, p):
    """float64 softmax([q·Pkᵀ, q·Kᵀ masked]) ∘ keep / (1 − p) @ [Pv; V]."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if pk.dim() == 3:
        pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    keys = torch.cat([pk, k], 2).repeat_interleave(H // Hkv, 1)
    vals = torch.cat([pv, v], 2).repeat_interleave(H // Hkv, 1)
    scores = q @ keys.transpose(-1, -2) * scale
    if attn_mask is not None:
        allowed = attn_mask.expand(B, H, L, S)
    elif causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L).expand(B, H, L, S)
    else:
        allowed = torch.ones(B, H, L, S, dtype=torch.bool, device=q.device)
    allowed = torch.cat([torch.ones(B, H, L, pk.shape[2], dtype=torch.bool, device=q.device), allowed], -1)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (probs * keep / (1 - p)) @ vals


def _check_dropout(inputs, *, causal, attn_mask, p, dtype, seed=1234):
    """Output and gradients with attention dropout against the float64 oracle fed the kernel's own keep
    mask (the mask is the RNG's, not under test here; its keep rate is)."""
    q = inputs[0]
    B, H, L, D = q.shape
    P, S = inputs[3].shape[-2], inputs[1].shape[2]
    with triton_ops.poison_outputs():
        out = triton_prefix_attention(*inputs, causal=causal, attn_mask=attn_mask, dropout_p=p, seed=seed)
        dout = dev(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
        grads = torch.autograd.grad(out, inputs, dout)
    keep = triton_ops.attention_dropout_mask(B, H, L, P + S, p, seed, device=DEVICE)
    assert 0.5 * (1 - p) < keep.float().mean().item() < 1.5 * (1 - p) + 0.01
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = _dropout_reference(*ref_in, causal=causal, attn_mask=attn_mask, scale=1 / math.sqrt(D), keep=keep, p=p)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    names = ["out", "dq", "dk", "dv", "dpk", "dpv"]
    for name, a, b in zip(names, (out,) + grads, (ref,) + ref_grads, strict=True):
        err = rel_err(a, b)
        assert err <= TOL[dtype], f"{name}: rel err {err:.2e} > {TOL[dtype]:.0e}"
    return out


@pytest.mark.parametrize(
    "B,H,Hkv,L,S,P,D,causal,padded,shared,p,dtype",
    [
        (2, 4, 2, 20, 20, 5, 32, True, False, True, 0.1, torch.float32),
        (1, 2, 1, 9, 37, 3, 32, False, False, False, 0.5, torch.float32),
        (2, 2, 2, 33, 33, 4, 16, True, True, True, 0.2, torch.float32),
        (2, 2, 1, 12, 12, 6, 32, True, False, True, 0.3, torch.float16),
        (1, 4, 4, 17, 17, 2, 64, True, True, False, 0.1, torch.bfloat16),
    ],
)
def test_dropout_matches_reference_with_the_kernel_mask(B, H, Hkv, L, S, P, D, causal, padded, shared, p, dtype):
    inputs = _make(B, H, Hkv, L, S, P, D, dtype, shared, 17)
    mask = _padding_mask(B, L, S, [2, 0][:B], [S, S - 3][:B], causal) if padded else None
    seed = 1234
    out = _check_dropout(inputs, causal=causal, attn_mask=mask, p=p, dtype=dtype, seed=seed)
    # same seed, same result; the default seed follows torch.manual_seed
    again = triton_prefix_attention(*inputs, causal=causal, attn_mask=mask, dropout_p=p, seed=seed)
    assert torch.equal(out, again)
    torch.manual_seed(3)
    a = triton_prefix_attention(*inputs, causal=causal, attn_mask=mask, dropout_p=p)
    torch.manual_seed(3)
    assert torch.equal(a, triton_prefix_attention(*inputs, causal=causal, attn_mask=mask, dropout_p=p))


# ------------------------------------------------------- the GPU grid: P = 1…128, head dims 64–256

GRID_P = (1, 7, 32, 64, 128)
GRID_D = (64, 80, 96, 128, 256)
# (Hkv, group): MHA, GQA 2/4/8, MQA
GRID_HEADS = ((2, 1), (1, 4), (2, 2), (4, 2), (1, 8))
# (L, S): several tiles of the largest blocks, ragged edges, decode (L = 1), L > S and S > L
GRID_LENGTHS = ((300, 300), (129, 129), (1, 257), (200, 77), (64, 320))


def _grid_case(k: int, dtype: torch.dtype, D: int, P: int, *, cpu: bool = False):
    Hkv, group = GRID_HEADS[k % 5]
    L, S = GRID_LENGTHS[(k // 2) % 5] if not cpu else (17, 23)
    pad = ("none", "left", "right")[k % 3]
    p = 0.1 if k % 4 == 3 else 0.0
    case = (2, Hkv * group, Hkv, L, S, P, D, k % 2 == 0, pad, (k // 2) % 2 == 0, p, dtype)
    name = f"{str(dtype)[6:]}-D{D}-P{P}-h{Hkv * group}kv{Hkv}-L{L}-S{S}-{pad}-p{p}"
    return pytest.param(*case, id=name, marks=() if cpu else gpu_only)


def _grid_cases():
    """Every head dim × dtype once with a P chosen so that each dtype sees every P (a Latin square:
    15 cases, not the 75 of the full product), plus every P for the headline bf16 / D = 128 path;
    heads, lengths, causality, padding, shared prefix and dropout cycle over the cases. Two small
    cases run in the interpreter too, so the test itself is checked on CPU."""
    cases, k = [], 0
    for j, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        for d, D in enumerate(GRID_D):
            cases.append(_grid_case(k, dtype, D, GRID_P[(d + 2 * j) % 5]))
            k += 1
    for P in GRID_P:
        cases.append(_grid_case(k, torch.bfloat16, 128, P))
        k += 1
    cases.append(_grid_case(0, torch.float32, 256, 128, cpu=True))
    cases.append(_grid_case(3, torch.bfloat16, 64, 64, cpu=True))
    return cases


@pytest.mark.parametrize("B,H,Hkv,L,S,P,D,causal,pad,shared,p,dtype", _grid_cases())
def test_grid_against_float64(B, H, Hkv, L, S, P, D, causal, pad, shared, p, dtype):
    inputs = _make(B, H, Hkv, L, S, P, D, dtype, shared, L + S + P + D)
    mask = None
    if pad == "left":  # first row left-padded, second full: the kernel gets per-sequence key ranges
        mask = _padding_mask(B, L, S, [S // 3, 0], [S, S], causal)
    elif pad == "right":
        mask = _padding_mask(B, L, S, [0, 0], [S - S // 4, S], causal)
    if p > 0:
        _check_dropout(inputs, causal=causal, attn_mask=mask, p=p, dtype=dtype)
    else:
        _check(inputs, causal=causal, attn_mask=mask, dtype=dtype)
