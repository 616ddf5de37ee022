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

On CPU in fp32/fp64 with more than one block of rows and a small ``m·d``, both directions run
the same calls block by block (``csrc/adapter_cpu.cpp``): each thread takes 128 rows at a time,
so a block of ``X`` or ``dY`` is read from memory once and the other passes over it (the
residual, the second GEMM, the weight gradients) hit L2. The weight gradients accumulate per
thread. That accumulator traffic grows with ``m·d``, so larger adapters keep the one-call path
(see ``_blocked_ops``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import cpu_ext_op, resolve_backend, try_kernel
from ._autocast import in_autocast_dtype
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


_BLOCK_ROWS = 128
# Where the blocked path runs: measured fwd+bwd, fp32, paired against the one-call path in one
# process (2 threads unless said): N = 4096, d = 1024, m = 64: relu 0.97-0.98x, silu 0.94x,
# gelu 0.97x (1 thread) to 1.02-1.03x, relu with 1 thread 0.85x; d = 768 with m = 48 or 64:
# 0.89-0.98x. Slower: m = 16 (1.06-1.12x: a block's r-thin GEMMs are mostly call overhead),
# m = 32 even (1.01x), and m·d from 128 Ki up (d = 4096 or m = 128: 1.01-1.23x, the per-thread
# weight-gradient accumulators outgrow L2).
_BLOCKED_MIN_M = 48
_BLOCKED_MAX_MD = 64 * 1024


def _blocked_ops(x2: torch.Tensor, m: int, d_out: int):
    """The row-blocked ``(forward, backward)`` ops of ``csrc/adapter_cpu.cpp`` when they apply, else None."""
    n, d = x2.shape
    if x2.device.type != "cpu" or x2.dtype not in (torch.float32, torch.float64):
        return None
    if n <= _BLOCK_ROWS or m < _BLOCKED_MIN_M or m * max(d, d_out) > _BLOCKED_MAX_MD:
        return None  # one block is the one-call path; the other limits are measured (above)
    fwd, bwd = cpu_ext_op("adapter_forward"), cpu_ext_op("adapter_backward")
    return None if fwd is None or bwd is None else (fwd, bwd)


class _AdapterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, down_w, down_b, up_w, up_b, activation: str, residual: bool):  # type: ignore[override]
        d, m = x.shape[-1], down_w.shape[0]
        x2 = x.reshape(-1, d)
        n = x2.shape[0]
        has_ub = up_b is not None
        w_hat = torch.cat([up_w, up_b.unsqueeze(1)], dim=1) if has_ub else up_w  # [d_out, m(+1)]
        blocked = _blocked_ops(x2, m, up_w.shape[0])
        if blocked is not None:
            y, a_hat, h = blocked[0](x2, down_w, down_b, w_hat.t().contiguous(), activation, residual, _BLOCK_ROWS)
        else:
            h = torch.addmm(down_b, x2, down_w.t()) if down_b is not None else x2 @ down_w.t()
            a_hat = torch.empty(n, m + int(has_ub), dtype=x.dtype, device=x.device)
            _act(activation, h, a_hat[:, :m])
            if has_ub:
                a_hat[:, m] = 1.0
            y = torch.addmm(x2, a_hat, w_hat.t()) if residual else a_hat @ w_hat.t()
        ctx.save_for_backward(x, down_w, up_w, a_hat, None if activation == "relu" else h)
        ctx.blocked = blocked
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
        if ctx.blocked is not None:
            need_down, need_up = need_dw or need_db, need_uw or need_ub
            dx, ddw, ddb, dup_t = ctx.blocked[1](
                dy.contiguous(), x2, a_hat, h if h is not None else a_hat.new_empty(0), down_w, up_w,
                ctx.activation, ctx.residual, need_x, need_down, need_up, _BLOCK_ROWS)
            # dup_t = Âᵀ·dY [m(+1), d_out]: dWuᵀ, then dbu as the last row
            return (dx.view(x.shape) if need_x else None, ddw if need_dw else None,
                    ddb if (need_db and ctx.has_db) else None, dup_t[:m].t() if need_uw else None,
                    dup_t[m] if (need_ub and ctx.has_ub) else None, None, None)
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


@in_autocast_dtype
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
        ``[..., d]`` (``[..., d_out]`` without residual) in ``x``'s dtype; inside
        ``torch.autocast`` in the autocast dtype (the operands are cast to it, as for ``nn.Linear``).

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
