"""``ops.lora_branch``: ``base + s · (drop(x) Aᵀ) Bᵀ``, the LoRA term over a base product computed
elsewhere (a bitsandbytes layer's). Every implementation against a float64 oracle, forward and every
gradient (``base`` included), dropout through gradcheck with a fixed mask, the op on the dispatcher
(opcheck, a fullgraph compile) and its input checks."""
from __future__ import annotations

import pytest
import torch

from ptpeft_fast import ops
from ptpeft_fast.ops.lora_branch import TABLE


def _inputs(shape=(2, 5), d_in=12, d_out=10, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    return mk(*shape, d_out), mk(*shape, d_in), mk(r, d_in), mk(d_out, r)


def _oracle(base, x, a, b, s):
    d = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    base64, x64, a64, b64 = d(base), d(x), d(a), d(b)
    y = base64 + s * (x64 @ a64.t()) @ b64.t()
    return y, (base64, x64, a64, b64)


@pytest.mark.parametrize("impl", TABLE.names)
@pytest.mark.parametrize("shape", [(7,), (2, 5), (1, 3, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_forward_and_every_gradient_match_float64(impl, shape, dtype, tol):
    base, x, a, b = _inputs(shape, dtype=dtype, seed=len(shape))
    y = ops.lora_branch(base, x, a, b, 0.75, backend=impl)
    assert y.dtype == dtype and y.shape == base.shape
    ref, leaves = _oracle(base, x, a, b, 0.75)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    y.backward(gy.to(dtype))
    ref.backward(gy)
    for mine, theirs in zip((base, x, a, b), leaves, strict=True):
        scale = theirs.grad.abs().max().clamp_min(1e-30)
        assert float((mine.grad.double() - theirs.grad).abs().max() / scale) <= tol * 5


def test_dropout_gradients_by_gradcheck():
    """With dropout the mask is drawn from torch's generator: seeding before each call makes the
    function deterministic, so gradcheck checks the written-out backward against finite differences."""
    base, x, a, b = (t.detach().double().requires_grad_(True) for t in _inputs())

    def f(base, x, a, b):
        torch.manual_seed(3)
        return ops.lora_branch(base, x, a, b, 0.5, dropout_p=0.3, backend="separate")
    assert torch.autograd.gradcheck(f, (base, x, a, b))
    # and it is dropout: some of x's entries do not reach the branch
    torch.manual_seed(3)
    y = f(base, x, a, b)
    assert not torch.allclose(y, _oracle(base, x, a, b, 0.5)[0])


def test_frozen_inputs_get_no_gradient_and_base_passes_through():
    base, x, a, b = _inputs()
    x = x.detach()
    y = ops.lora_branch(base, x, a, b, 2.0)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert x.grad is None and torch.equal(base.grad, gy) and a.grad is not None and b.grad is not None


def test_on_the_dispatcher():
    base, x, a, b = _inputs()
    torch.library.opcheck(torch.ops.ptpeft_fast.lora_branch_forward, (base, x, a, b, None, 0.5, 0.0))
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= 0.2
    torch.library.opcheck(torch.ops.ptpeft_fast.lora_branch_forward, (base, x, a, b, keep, 0.5, 0.2))

    def f(base, x, a, b):
        return ops.lora_branch(base, x, a, b, 0.5).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(base, x, a, b)
    eager.backward()
    grads = [t.grad.clone() for t in (base, x, a, b)]
    for t in (base, x, a, b):
        t.grad = None
    out = compiled(base, x, a, b)
    out.backward()
    torch.testing.assert_close(out, eager)
    for t, g in zip((base, x, a, b), grads, strict=True):
        torch.testing.assert_close(t.grad, g)
    assert ops.explain(ops.lora_branch, base, x, a, b, 0.5).chosen == "separate"


@pytest.mark.parametrize("change,says", [
    (lambda t: (t[0][..., :-1], *t[1:]), "base must be"),
    (lambda t: (t[0], t[1], t[2][:, :-1], t[3]), "lora_a must be"),
    (lambda t: (t[0], t[1], t[2], t[3][:, :-1]), "lora_b must be"),
    (lambda t: (t[0], t[1], t[2].double(), t[3]), "lora_a"),
])
def test_bad_inputs_are_named(change, says):
    args = change(tuple(t.detach() for t in _inputs()))
    with pytest.raises(ValueError, match=says):
        ops.lora_branch(*args, 0.5)
    with pytest.raises(ValueError, match="scaling"):
        ops.lora_branch(*(t.detach() for t in _inputs()), float("nan"))
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_branch(*(t.detach() for t in _inputs()), 0.5, dropout_p=1.0)
