r"""Bottleneck adapter: ``y = x + up(act(down(x)))`` (``residual=False``: no ``x +``).

``down``: ``Wd [m, d]``, ``bd [m]``; ``up``: ``Wu [d, m]``, ``bu [d]``; ``act`` is relu, gelu
(exact, erf) or silu. With ``X [N, d]`` (tokens flattened), ``dY`` the output gradient::

    H  = X Wdᵀ + bd             addmm
    A  = act(H)                 [N, m], stored with a column of ones: Â = [A | 1]
    Y  = X + Â Ŵuᵀ,  Ŵu = [Wu | bu]     one addmm adds the up bias AND the residual

Backward::

    dA  = dY Wu                 [N, m]
    dH  = act'(H) ∘ dA          (fused ATen *_backward kernels on the small [N, m])
    dŴu = dYᵀ Â                 → dWu = dŴu[:, :m], dbu = dŴu[:, m] (the bias sum for free)
    dWd = dHᵀ X,   dbd = Σ_rows dH
    dX  = dY + dH Wd            one addmm adds the residual gradient

Saved: ``x`` (a reference to the caller's tensor), ``Â`` and, for gelu/silu, ``H`` — both
``[N, m]``, small next to ``x``. No ``[N, d]`` temporary is created besides ``y`` and ``dx``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import resolve_backend, try_kernel
from ._checks import check_dtype_device

__all__ = ["adapter", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "gelu", "silu")


def _act(name: str, h: torch.Tensor, out: torch.Tensor) -> None:
    if name == "relu":
        torch.clamp_min(h, 0, out=out)
    elif name == "gelu":
        out.copy_(F.gelu(h))
    else:
        out.copy_(F.silu(h))


def _act_backward(name: str, grad: torch.Tensor, h: Optional[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)  # relu'(h) = [a > 0]
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.silu_backward(grad, h)


class _AdapterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, down_w, down_b, up_w, up_b, activation: str, residual: bool):  # type: ignore[override]
        d, m = x.shape[-1], down_w.shape[0]
        x2 = x.reshape(-1, d)
        n = x2.shape[0]
        h = torch.addmm(down_b, x2, down_w.t()) if down_b is not None else x2 @ down_w.t()
        has_ub = up_b is not None
        a_hat = torch.empty(n, m + int(has_ub), dtype=x.dtype, device=x.device)
        _act(activation, h, a_hat[:, :m])
        if has_ub:
            a_hat[:, m] = 1.0
            w_hat = torch.cat([up_w, up_b.unsqueeze(1)], dim=1)  # [d, m+1]
        else:
            w_hat = up_w
        y = torch.addmm(x2, a_hat, w_hat.t()) if residual else a_hat @ w_hat.t()
        ctx.save_for_backward(x, down_w, up_w, a_hat, None if activation == "relu" else h)
        ctx.activation, ctx.residual, ctx.has_db, ctx.has_ub = activation, residual, down_b is not None, has_ub
        return y.view(x.shape[:-1] + (up_w.shape[0],))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, down_w, up_w, a_hat, h = ctx.saved_tensors
        need_x, need_dw, need_db, need_uw, need_ub = ctx.needs_input_grad[:5]
        d, m = x.shape[-1], down_w.shape[0]
        x2 = x.reshape(-1, d)
        dy = grad_y.reshape(-1, up_w.shape[0])

        dx = ddw = ddb = duw = dub = None
        if need_uw or need_ub:
            # [d, m(+1)], last column Σ_rows dY; the thin operand as a contiguous left factor is
            # the fast GEMM orientation on CPU
            dw_hat = (a_hat.t().contiguous() @ dy).t()
            duw = dw_hat[:, :m] if need_uw else None
            dub = dw_hat[:, m] if (need_ub and ctx.has_ub) else None
        if need_x or need_dw or need_db:
            dh = _act_backward(ctx.activation, dy @ up_w, h, a_hat[:, :m])
            if need_x:
                dx = torch.addmm(dy, dh, down_w) if ctx.residual else dh @ down_w
                dx = dx.view(x.shape)
            if need_dw:
                ddw = dh.t().contiguous() @ x2
            if need_db and ctx.has_db:
                ddb = dh.sum(0)
        return dx, ddw, ddb, duw, dub, None, None


def _validate(x, down_weight, down_bias, up_weight, up_bias, activation, residual) -> None:
    for name, t in (("x", x), ("down_weight", down_weight), ("up_weight", up_weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"adapter: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"adapter: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter: activation={activation!r} is not one of {ACTIVATIONS}")
    if not x.is_floating_point():
        raise ValueError(f"adapter: x must be floating point, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("adapter: x must have at least one dimension (features last)")
    d = x.shape[-1]
    if down_weight.dim() != 2 or down_weight.shape[1] != d or down_weight.shape[0] < 1:
        raise ValueError(
            f"adapter: down_weight must be [bottleneck, d] = [m, {d}] with m >= 1, got {tuple(down_weight.shape)}"
        )
    m = down_weight.shape[0]
    d_out = d if residual else (up_weight.shape[0] if up_weight.dim() == 2 else -1)
    if up_weight.dim() != 2 or up_weight.shape[1] != m or up_weight.shape[0] != d_out or d_out < 1:
        want = f"[{d}, {m}]" if residual else f"[d_out, {m}]"
        raise ValueError(
            f"adapter: up_weight must be [d_out, bottleneck] = {want}, got {tuple(up_weight.shape)}"
            + (" (residual=True needs d_out == d)" if residual else "")
        )
    if down_bias is not None and tuple(down_bias.shape) != (m,):
        raise ValueError(f"adapter: down_bias must be [bottleneck] = [{m}], got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (up_weight.shape[0],):
        raise ValueError(f"adapter: up_bias must be [d_out] = [{up_weight.shape[0]}], got {tuple(up_bias.shape)}")
    check_dtype_device("adapter", "x", x, (("down_weight", down_weight), ("down_bias", down_bias),
                                            ("up_weight", up_weight), ("up_bias", up_bias)))


def adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
    activation: str = "relu",
    residual: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Bottleneck adapter ``x + up(act(down(x)))`` with autograd.

    Args:
        x: ``[..., d]`` input.
        down_weight: ``[m, d]``; down_bias: ``[m]`` or None.
        up_weight: ``[d, m]`` (``[d_out, m]`` when ``residual`` is False); up_bias: ``[d_out]`` or None.
        activation: ``"relu"``, ``"gelu"`` (exact) or ``"silu"``.
        residual: add ``x`` to the output.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., d]`` (``[..., d_out]`` without residual) in ``x``'s dtype.

    Raises:
        ValueError: on an unknown activation or mismatched shapes, dtypes or devices.
    """
    _validate(x, down_weight, down_bias, up_weight, up_bias, activation, residual)
    chosen = resolve_backend("adapter", backend, x, down_weight, down_bias, up_weight, up_bias)
    if chosen == "triton":
        from . import triton_ops

        out = try_kernel(backend, lambda: triton_ops.adapter(x, down_weight, down_bias, up_weight, up_bias, activation, residual))
        if out is not None:
            return out
    return _AdapterFn.apply(x, down_weight, down_bias, up_weight, up_bias, activation, bool(residual))
