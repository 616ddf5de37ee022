"""Fused LoRA linear in Triton against the torch path in float64 (interpreter on CPU tensors, or
compiled on CUDA with the interpreter off: triton_test_utils.DEVICE).

Output and every gradient (x, W when it trains, b, A, B), outputs NaN-poisoned before each
launch; dropout cases use the kernel's own seeded keep-mask in the float64 oracle.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from _oracles import lora_linear_reference  # noqa: E402

from ptpeft_fast.ops import (
    lora_linear,  # noqa: E402
    triton_ops,  # noqa: E402
)

from triton_test_utils import DEVICE, TOL, dev, fast_interpreter, needs_triton_device, rel_err, triton_lora_linear  # noqa: E402,F401

pytestmark = needs_triton_device

N_RANDOM = 54


def _make(lead, K, N, r, dtype, has_bias, train_w, seed):
    g = torch.Generator().manual_seed(seed)

    def r_(*shape, grad=True, s=1.0):
        return dev((torch.randn(*shape, generator=g) * s).to(dtype)).requires_grad_(grad)

    x = r_(*lead, K)
    w = r_(N, K, grad=train_w, s=K**-0.5)
    b = r_(N, s=0.5) if has_bias else None
    a = r_(r, K, s=K**-0.5)
    bb = r_(N, r, s=r**-0.5)  # non-zero B (a fresh LoRA has B = 0, which would hide dA errors)
    return x, w, b, a, bb


def _check(x, w, b, a, bb, scaling, dropout_p, dtype, seed=1234):
    inputs = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    with triton_ops.poison_outputs():
        y = triton_lora_linear(x, w, b, a, bb, scaling, dropout_p, seed=seed)
        dy = dev(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        grads = torch.autograd.grad(y, inputs, dy)
    d = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bb)]
    if dropout_p > 0:
        rows = x.numel() // x.shape[-1]
        keep = triton_ops.lora_dropout_mask((rows, x.shape[-1]), dropout_p, seed, device=DEVICE).reshape(x.shape)
        ref = lora_linear_reference(*d, scaling, keep=keep, dropout_p=dropout_p)
    else:
        ref = lora_linear(*d, scaling, backend="torch")
    ref_in = [t for t in d if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    for i, (g_, r_) in enumerate(zip((y,) + grads, (ref,) + ref_grads, strict=True)):
        err = rel_err(g_, r_)
        assert err <= tol, f"output/grad #{i}: rel err {err:.2e} > {tol:.0e}"


def _cases():
    rng = random.Random(7)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    out = []
    for i in range(N_RANDOM):
        lead = rng.choice([(rng.randint(1, 40),), (2, rng.randint(1, 20)), (1,)])
        K = rng.randint(4, 72)
        N = rng.randint(4, 72)
        r = rng.choice([1, 2, 4, 8, 16, 32])
        p = rng.choice([0.0, 0.0, 0.0, 0.1, 0.5])
        out.append(pytest.param(lead, K, N, r, rng.random() < 0.7, rng.random() < 0.25, rng.choice([0.5, 2.0]), p,
                                dtypes[i % 3], i, id=f"c{i}-{dtypes[i % 3]}".replace("torch.", "")))
    return out


@pytest.mark.parametrize("lead,K,N,r,has_bias,train_w,scaling,p,dtype,seed", _cases())
def test_random_cases(lead, K, N, r, has_bias, train_w, scaling, p, dtype, seed):
    x, w, b, a, bb = _make(lead, K, N, r, dtype, has_bias, train_w, seed)
    _check(x, w, b, a, bb, scaling, p, dtype, seed=seed + 99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_public_op_dispatches_to_triton(dtype):
    x, w, b, a, bb = _make((3, 11), 40, 24, 8, dtype, True, False, 0)
    with triton_ops.poison_outputs():
        y = lora_linear(x, w, b, a, bb, 2.0, backend="triton")
    ref = lora_linear(*(t.detach().double() for t in (x, w, b, a, bb)), 2.0, backend="torch")
    assert rel_err(y, ref) <= TOL[dtype]


def test_frozen_input_and_only_b_trains():
    """x without grad (first layer) and A frozen: only dB is computed; dX kernel skips dX."""
    x, w, b, a, bb = _make((17,), 33, 21, 4, torch.float32, True, False, 5)
    x.requires_grad_(False)
    a.requires_grad_(False)
    _check(x, w, b, a, bb, 1.0, 0.0, torch.float32)


def test_dropout_mask_statistics_and_determinism():
    keep = triton_ops.lora_dropout_mask((64, 96), 0.25, 42, device=DEVICE)
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    assert torch.equal(keep, triton_ops.lora_dropout_mask((64, 96), 0.25, 42, device=DEVICE))
    assert not torch.equal(keep, triton_ops.lora_dropout_mask((64, 96), 0.25, 43, device=DEVICE))
    # the seed defaults to torch's generator: manual_seed reproduces the output
    x, w, b, a, bb = _make((9,), 20, 12, 4, torch.float32, True, False, 2)
    torch.manual_seed(0)
    y1 = triton_lora_linear(x, w, b, a, bb, 1.0, 0.5)
    torch.manual_seed(0)
    y2 = triton_lora_linear(x, w, b, a, bb, 1.0, 0.5)
    assert torch.equal(y1, y2)


def test_rank_over_256_refused():
    x, w, b, a, bb = _make((2,), 8, 8, 257, torch.float32, False, False, 0)
    with pytest.raises(ValueError, match="rank"):
        triton_lora_linear(x, w, b, a, bb, 1.0)
