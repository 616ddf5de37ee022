"""The fused LM-head loss's Triton row kernel (kernels/cross_entropy.py) through
ops.linear_cross_entropy(backend="triton"), against a float64 reference: interpreter on CPU
tensors, or compiled on CUDA with the interpreter off (triton_test_utils.DEVICE; tools/gpu_check.py
runs this file there)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ptpeft_fast.ops import linear_cross_entropy  # noqa: E402

from triton_test_utils import dev, needs_triton_device, rel_err  # noqa: E402

pytestmark = needs_triton_device


@pytest.mark.parametrize("N,H,V", [(37, 16, 53), (64, 32, 5000), (8, 64, 49152)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_rows_match_float64(N, H, V, dtype, reduction):
    g = torch.Generator().manual_seed(N + V)
    h = dev(torch.randn(N, H, generator=g).to(dtype)).requires_grad_()
    w = dev((torch.randn(V, H, generator=g) / H**0.5).to(dtype))
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    y = dev(y)
    out = linear_cross_entropy(h, w, y, reduction=reduction, backend="triton")
    go = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device)
    gh, = torch.autograd.grad(out, [h], go)
    h64 = h.detach().double().requires_grad_()
    z = h64 @ w.double().t()
    keep = y != -100
    nll = -(z.log_softmax(-1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)) * keep
    ref = nll if reduction == "none" else nll.sum() / keep.sum()
    ref_gh, = torch.autograd.grad(ref, [h64], go.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out.detach(), ref.detach()) <= tol
    assert rel_err(gh, ref_gh) <= tol
