"""Fused bottleneck Adapter in Triton against the torch path in float64 (interpreter on CPU tensors,
or compiled on CUDA with the interpreter off: triton_test_utils.DEVICE).

Output and every gradient (x, W_down, b_down, W_up, b_up) for relu/gelu/silu, with and
without the residual and the biases; outputs NaN-poisoned before each launch.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from ptpeft_fast.ops import (
    adapter,  # noqa: E402
    triton_ops,  # noqa: E402
)

from triton_test_utils import TOL, dev, fast_interpreter, needs_triton_device, rel_err, triton_adapter  # noqa: E402,F401

pytestmark = needs_triton_device

N_RANDOM = 54


def _make(lead, d, h, dtype, has_bd, has_bu, seed):
    g = torch.Generator().manual_seed(seed)

    def r_(*shape, s=1.0):
        return dev((torch.randn(*shape, generator=g) * s).to(dtype)).requires_grad_()

    x = r_(*lead, d)
    wd = r_(h, d, s=d**-0.5)
    bd = r_(h, s=0.5) if has_bd else None
    wu = r_(d, h, s=h**-0.5)  # non-zero up-projection (a fresh adapter's zeros hide errors)
    bu = r_(d, s=0.5) if has_bu else None
    return x, wd, bd, wu, bu


def _check(tensors, activation, residual, dtype):
    inputs = [t for t in tensors if t is not None]
    with triton_ops.poison_outputs():
        y = triton_adapter(*tensors, activation=activation, residual=residual)
        dy = dev(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        grads = torch.autograd.grad(y, inputs, dy)
    d = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    ref = adapter(*d, activation=activation, residual=residual, backend="torch")
    ref_grads = torch.autograd.grad(ref, [t for t in d if t is not None], dy.double())
    assert y.dtype == dtype and y.shape == ref.shape
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip((y,) + grads, (ref,) + ref_grads, strict=True)):
        err = rel_err(a, b)
        assert err <= tol, f"output/grad #{i}: rel err {err:.2e} > {tol:.0e}"


def _cases():
    rng = random.Random(11)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    out = []
    for i in range(N_RANDOM):
        lead = rng.choice([(rng.randint(1, 40),), (2, rng.randint(1, 20)), (1,)])
        d = rng.randint(4, 80)
        h = rng.choice([1, 3, 8, 16, rng.randint(2, 64)])
        act = ("relu", "gelu", "silu")[i % 3]
        dt = dtypes[(i // 3) % 3]
        out.append(pytest.param(lead, d, h, act, rng.random() < 0.8, rng.random() < 0.85, rng.random() < 0.8, dt, i,
                                id=f"c{i}-{act}-{dt}".replace("torch.", "")))
    return out


@pytest.mark.parametrize("lead,d,h,act,residual,has_bd,has_bu,dtype,seed", _cases())
def test_random_cases(lead, d, h, act, residual, has_bd, has_bu, dtype, seed):
    _check(_make(lead, d, h, dtype, has_bd, has_bu, seed), act, residual, dtype)


def test_bottleneck_256_on_chip():
    _check(_make((5,), 24, 256, torch.float32, True, True, 0), "gelu", True, torch.float32)


def test_public_op_dispatches_to_triton_and_refuses_wide_bottleneck():
    x, wd, bd, wu, bu = _make((2, 3), 16, 8, torch.float32, True, True, 1)
    with triton_ops.poison_outputs():
        y = adapter(x, wd, bd, wu, bu, activation="silu", backend="triton")
    ref = adapter(*(t.detach().double() for t in (x, wd, bd, wu, bu)), activation="silu", backend="torch")
    assert rel_err(y, ref) <= 1e-5
    x, wd, bd, wu, bu = _make((2,), 8, 257, torch.float32, True, True, 1)
    with pytest.raises(ValueError, match="bottleneck"):
        triton_adapter(x, wd, bd, wu, bu)
    with pytest.raises(ValueError, match="activation"):
        triton_adapter(x, wd, bd, wu, bu, activation="tanh")


def test_frozen_weights_only_dx():
    x, wd, bd, wu, bu = _make((13,), 20, 6, torch.float32, True, True, 4)
    for t in (wd, bd, wu, bu):
        t.requires_grad_(False)
    with triton_ops.poison_outputs():
        y = triton_adapter(x, wd, bd, wu, bu, activation="relu")
        (dx,) = torch.autograd.grad(y.sum(), [x])
    xd = x.detach().double().requires_grad_()
    ref = adapter(xd, *(t.double() for t in (wd, bd, wu, bu)), activation="relu", backend="torch")
    (rdx,) = torch.autograd.grad(ref.sum(), [xd])
    assert rel_err(dx, rdx) <= 1e-5
