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
(see ``BLOCKED_MIN_M``, ``BLOCKED_MAX_MD``).

Implementations (:data:`TABLE`, first that applies under ``backend="auto"``): ``triton`` (CUDA, one
kernel per direction, bottleneck ≤ 256 on chip), ``blocked_cpp`` (the row blocks above), ``fused``
(the calls above in one pass each, any device) and ``torch`` (the reference, plain autograd ops).
The ops ``ptpeft_fast::adapter_forward`` → ``(y, Â, H)`` and ``ptpeft_fast::adapter_backward`` (its
autograd formula) have fake kernels: ``torch.compile`` traces a patched layer as one graph.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..op_names import ACTIVATIONS
from . import availability as avail
from . import dispatch
from ._autocast import in_autocast_dtype
from ._checks import check_dtype_device

__all__ = ["adapter", "ACTIVATIONS", "TABLE", "AdapterCall"]


_first = dispatch.first_reason


def _act(name: str, h: torch.Tensor, out: torch.Tensor) -> None:
    if name == "relu":
        torch.clamp_min(h, 0, out=out)
    elif name == "gelu":
        out.copy_(F.gelu(h))  # through a temporary: CPU gelu(out=) writes a strided output wrongly (torch 2.13)
    else:
        out.copy_(F.silu(h))


def _act_backward(name: str, grad: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)  # relu'(h) = [a > 0]
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.silu_backward(grad, h)


BLOCK_ROWS = 128
# Where blocked_cpp runs: measured fwd+bwd, fp32, paired against the one-call path in one
# process (2 threads unless said): N = 4096, d = 1024, m = 64: relu 0.97-0.98x, silu 0.94x,
# gelu 0.97x (1 thread) to 1.02-1.03x, relu with 1 thread 0.85x; d = 768 with m = 48 or 64:
# 0.89-0.98x. Slower: m = 16 (1.06-1.12x: a block's r-thin GEMMs are mostly call overhead),
# m = 32 even (1.01x), and m·d from 128 Ki up (d = 4096 or m = 128: 1.01-1.23x, the per-thread
# weight-gradient accumulators outgrow L2).
BLOCKED_MIN_M = 48
BLOCKED_MAX_MD = 64 * 1024


class AdapterCall(NamedTuple):
    """What the table needs to know about one call (plain values)."""

    device: str
    dtype: torch.dtype
    n: int
    d: int
    m: int
    d_out: int


def _call(x, down_weight, down_bias, up_weight, up_bias, activation="relu", residual=True, **_) -> AdapterCall:
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return AdapterCall(x.device.type, x.dtype, n, x.shape[-1], down_weight.shape[0], up_weight.shape[0])


def _blocked_applies(c: AdapterCall) -> Optional[str]:
    return _first((c.device != "cpu", "CPU only"),
                  (c.dtype not in (torch.float32, torch.float64), f"{c.dtype} (fp32/fp64 only)"),
                  (not avail.ext_op("adapter_blocked_forward"), "the C++ extension is unavailable"))


def _blocked_auto(c: AdapterCall) -> Optional[str]:
    """The measured range (above) where it beats the fused path."""
    return _first((c.n <= BLOCK_ROWS, f"{c.n} rows: one block is the fused path"),
                  (c.m < BLOCKED_MIN_M, f"bottleneck {c.m} < {BLOCKED_MIN_M} (measured slower)"),
                  (c.m * max(c.d, c.d_out) > BLOCKED_MAX_MD, f"m·d = {c.m * max(c.d, c.d_out)} > {BLOCKED_MAX_MD} "
                                                              "(measured slower)"))


def _triton_applies(c: AdapterCall) -> Optional[str]:
    return avail.triton_declines(c.device, c.dtype) or _first(
                  (c.m > 256, f"bottleneck {c.m} > 256 does not fit on chip"),
                  (c.d_out != c.d, "d_out != d"))


TABLE = dispatch.Table("adapter", [
    dispatch.Impl("triton", _triton_applies, auto=("cuda",), summary="kernels/adapter.py"),
    dispatch.Impl("blocked_cpp", _blocked_applies, auto=_blocked_auto, summary="csrc/adapter_cpu.cpp"),
    dispatch.Impl("fused", lambda c: None, summary="addmm with the bias and residual folded in"),
    dispatch.Impl("torch", lambda c: None, summary="reference: plain autograd ops"),
])
dispatch.register(TABLE, _call)


# ----------------------------------------------------------------------------- the ops


@torch.library.custom_op("ptpeft_fast::adapter_forward", mutates_args=())
def _forward_op(x: torch.Tensor, down_w: torch.Tensor, down_b: Optional[torch.Tensor], up_w: torch.Tensor,
                up_b: Optional[torch.Tensor], activation: str, residual: bool,
                impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., d_out], Â, H)`` — what the backward of ``impl`` reads (Triton: ``Z`` as ``Â``, ``H`` empty)."""
    d, m, d_out = x.shape[-1], down_w.shape[0], up_w.shape[0]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    if impl == "triton":
        from . import triton_ops

        y, z = triton_ops.adapter_forward(x2, down_w, down_b, up_w, up_b, activation, residual)
        return y.view(x.shape[:-1] + (d_out,)), z, x2.new_empty(0)
    has_ub = up_b is not None
    w_hat = torch.cat([up_w, up_b.unsqueeze(1)], dim=1) if has_ub else up_w  # [d_out, m(+1)]
    if impl == "blocked_cpp":
        y, a_hat, h = torch.ops.ptpeft_fast.adapter_blocked_forward(x2, down_w, down_b, w_hat.t().contiguous(),
                                                                    activation, residual, BLOCK_ROWS)
    elif impl == "fused":
        h = torch.addmm(down_b, x2, down_w.t()) if down_b is not None else x2 @ down_w.t()
        a_hat = torch.empty(n, m + int(has_ub), dtype=x.dtype, device=x.device)
        _act(activation, h, a_hat[:, :m])
        if has_ub:
            a_hat[:, m] = 1.0
        y = torch.addmm(x2, a_hat, w_hat.t()) if residual else a_hat @ w_hat.t()
        if activation == "relu":
            h = x2.new_empty(0)  # relu' is read from Â
    else:
        raise ValueError(f"adapter_forward: no implementation {impl!r}")
    return y.view(x.shape[:-1] + (d_out,)), a_hat, h


@_forward_op.register_fake
def _(x, down_w, down_b, up_w, up_b, activation, residual, impl):
    n, m = x.numel() // x.shape[-1] if x.shape[-1] else 0, down_w.shape[0]
    y = x.new_empty(x.shape[:-1] + (up_w.shape[0],))
    if impl == "triton":
        return y, x.new_empty((n, m), dtype=torch.float32), x.new_empty(0)
    h = x.new_empty(0) if activation == "relu" else x.new_empty((n, m))
    return y, x.new_empty((n, m + int(up_b is not None))), h


@torch.library.custom_op("ptpeft_fast::adapter_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, down_w: torch.Tensor, up_w: torch.Tensor, a_hat: torch.Tensor,
                 h: torch.Tensor, activation: str, residual: bool, impl: str,
                 need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dWd, dbd, dWu, dbu)``; an input whose ``need`` is False (or an absent bias) gets an empty tensor."""
    d, m = x.shape[-1], down_w.shape[0]
    x2 = x.reshape(-1, d)
    dy = grad_y.reshape(-1, up_w.shape[0])
    need_x, need_dw, need_db, need_uw, need_ub = need
    if impl == "triton":
        from . import triton_ops

        grads = triton_ops.adapter_backward(dy, x2, down_w, up_w, a_hat, activation, residual, need)
    elif impl == "blocked_cpp":
        dx, ddw, ddb, dup_t = torch.ops.ptpeft_fast.adapter_blocked_backward(
            dy.contiguous(), x2, a_hat, h, down_w, up_w, activation, residual, need_x, need_dw or need_db,
            need_uw or need_ub, BLOCK_ROWS)
        # dup_t = Âᵀ·dY [m(+1), d_out]: dWuᵀ, then dbu as the last row
        # (the bias row is cloned: outputs of a torch.library op may not alias one another)
        grads = (dx, ddw, ddb, dup_t[:m].t() if need_uw else None, dup_t[m].clone() if need_ub else None)
    elif impl == "fused":
        grads = _fused_backward(dy, x2, down_w, up_w, a_hat, h, activation, residual, need)
    else:
        raise ValueError(f"adapter_backward: no implementation {impl!r}")
    refs = (x, down_w, down_w[:, 0], up_w, up_w[:, 0])
    # contiguous, as the fake kernel promises (some gradients come out as transposed views)
    return tuple(g.reshape(r.shape).contiguous() if n and g is not None else r.new_empty(0)
                 for g, r, n in zip(grads, refs, need, strict=True))


@_backward_op.register_fake
def _(grad_y, x, down_w, up_w, a_hat, h, activation, residual, impl, need):
    refs = (x, down_w, down_w[:, 0], up_w, up_w[:, 0])
    return tuple(r.new_empty(r.shape) if n else r.new_empty(0) for r, n in zip(refs, need, strict=True))


def _fused_backward(dy, x2, down_w, up_w, a_hat, h, activation: str, residual: bool, need: list[bool]):
    need_x, need_dw, need_db, need_uw, need_ub = need
    m = down_w.shape[0]
    dx = ddw = ddb = duw = dub = None
    if need_uw or need_ub:
        # [d, m(+1)], last column Σ_rows dY; the thin operand as a contiguous left factor is
        # the fast GEMM orientation on CPU
        dw_hat = (a_hat.t().contiguous() @ dy).t()
        duw = dw_hat[:, :m] if need_uw else None
        dub = dw_hat[:, m].clone() if need_ub else None  # outputs of a torch.library op may not alias
    if need_x or need_dw or need_db:
        dh = _act_backward(activation, dy @ up_w, h, a_hat[:, :m])
        if need_x:
            dx = torch.addmm(dy, dh, down_w) if residual else dh @ down_w
        if need_dw:
            ddw = dh.t().contiguous() @ x2
        if need_db:
            ddb = dh.sum(0)
    return dx, ddw, ddb, duw, dub


def _setup_context(ctx, inputs, output):
    x, down_w, down_b, up_w, up_b, activation, residual, impl = inputs
    _, a_hat, h = output
    ctx.save_for_backward(x, down_w, up_w, a_hat, h)
    ctx.activation, ctx.residual, ctx.impl = activation, residual, impl
    ctx.has_db, ctx.has_ub = down_b is not None, up_b is not None


def _backward(ctx, grad_y, grad_a_hat, grad_h):
    x, down_w, up_w, a_hat, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], n[2] and ctx.has_db, n[3], n[4] and ctx.has_ub]
    grads = _backward_op(grad_y, x, down_w, up_w, a_hat, h, ctx.activation, ctx.residual, ctx.impl, need)
    return (*(g if k else None for g, k in zip(grads, need, strict=True)), None, None, None)


torch.library.register_autograd("ptpeft_fast::adapter_forward", _backward, setup_context=_setup_context)


def _reference(x, down_weight, down_bias, up_weight, up_bias, activation: str, residual: bool) -> torch.Tensor:
    """The ``"torch"`` entry: plain autograd ops."""
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    y = F.linear(act(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return x + y if residual else y


# ----------------------------------------------------------------------------- public op


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
        backend: ``"auto"`` or an implementation of :data:`TABLE` (``"torch"``: the reference).

    Returns:
        ``[..., d]`` (``[..., d_out]`` without residual) in ``x``'s dtype; inside
        ``torch.autocast`` in the autocast dtype (the operands are cast to it, as for ``nn.Linear``).

    Raises:
        ValueError: on an unknown activation or mismatched shapes, dtypes or devices.
    """
    _validate(x, down_weight, down_bias, up_weight, up_bias, activation, residual)
    impl = TABLE.choose(backend, _call(x, down_weight, down_bias, up_weight, up_bias))
    if impl == "torch":
        return _reference(x, down_weight, down_bias, up_weight, up_bias, activation, bool(residual))
    y, _, _ = _forward_op(x, down_weight, down_bias, up_weight, up_bias, activation, bool(residual), impl)
    return y
