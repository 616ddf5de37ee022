r"""The LoRA branch added to a base product computed elsewhere: ``y = base + s · (drop(x) Aᵀ) Bᵀ``.

For linear layers whose weight is not a dense matrix (bitsandbytes 4-bit and 8-bit): the layer's
own forward computes ``base = x Wᵀ + b`` with its kernels and its own backward for ``x``, and this
op adds the LoRA term. With ``X`` = ``x`` as ``[N, in]``, ``dY`` the output gradient ``[N, out]``,
``X̃ = X ∘ keep / (1 - p)`` and ``T = X̃ Aᵀ [N, r]``::

    forward:   Y  = base + s T Bᵀ                  (one addmm, no [N, out] temporary besides Y)
    backward:  U  = dY B                            [N, r]
               d base = dY                          (the layer's own backward takes it from there)
               dX = s/(1-p) · keep ∘ (U A)          (added by autograd to the layer's dX)
               dA = s Uᵀ X̃                          [r, in]
               dB = s dYᵀ T                         [out, r]

Implementations (:data:`TABLE`): ``separate`` (the formulas above, ``T`` saved from the
forward) and ``torch`` (the reference: plain autograd ops). The op
``ptpeft_fast::lora_branch_forward`` → ``(y, T)`` has a fake kernel and a registered autograd
formula, so ``torch.compile`` traces it as one node.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import check_dtype_device

__all__ = ["lora_branch", "TABLE", "BranchCall"]


class BranchCall(NamedTuple):
    """What the table needs to know about one call."""

    device: str
    dtype: torch.dtype
    dropout: bool


def _call(base, x, lora_a, lora_b, scaling=1.0, dropout_p=0.0, **_) -> BranchCall:
    return BranchCall(x.device.type, x.dtype, dropout_p > 0)


TABLE = dispatch.Table("lora_branch", [
    dispatch.Impl("separate", lambda c: None, summary="base + sTBᵀ in one addmm, backward written out"),
    dispatch.Impl("torch", lambda c: None, summary="reference: plain autograd ops"),
])
dispatch.register(TABLE, _call)


@torch.library.custom_op("ptpeft_fast::lora_branch_forward", mutates_args=())
def _forward_op(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                keep: Optional[torch.Tensor], scaling: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, T)`` with ``T = drop(X) Aᵀ`` (kept for ``dB``)."""
    x2 = x.reshape(-1, x.shape[-1])
    if keep is not None:
        t = (x2 * keep.reshape(x2.shape)) @ lora_a.t()
        t.mul_(1.0 / (1.0 - dropout_p))
    else:
        t = x2 @ lora_a.t()
    y = torch.addmm(base.reshape(-1, base.shape[-1]), t, lora_b.t(), alpha=scaling)
    return y.view(base.shape), t


@_forward_op.register_fake
def _(base, x, lora_a, lora_b, keep, scaling, dropout_p):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return base.new_empty(base.shape), x.new_empty((n, lora_a.shape[0]))


@torch.library.custom_op("ptpeft_fast::lora_branch_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, t: torch.Tensor,
                 keep: Optional[torch.Tensor], scaling: float, dropout_p: float,
                 need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)``; one whose ``need`` is False is an empty tensor."""
    need_x, need_a, need_b = need
    x2, dy = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, lora_b.shape[0])
    inv = 1.0 / (1.0 - dropout_p)
    keep2 = None if keep is None else keep.reshape(x2.shape)
    u = dy @ lora_b if (need_x or need_a) else None
    dx = da = db = None
    if need_x:
        dx = (u @ lora_a).mul_(scaling * inv)
        if keep2 is not None:
            dx.mul_(keep2)
        dx = dx.reshape(x.shape)
    if need_a:
        xd = x2 if keep2 is None else x2 * keep2
        da = (u.t().contiguous() @ xd).mul_(scaling * inv)
    if need_b:
        db = (t.t().contiguous() @ dy).mul_(scaling).t().contiguous()
    refs = (x, lora_a, lora_b)
    return tuple(g.contiguous() if n else r.new_empty(0) for g, r, n in zip((dx, da, db), refs, need, strict=True))


@_backward_op.register_fake
def _(grad_y, x, lora_a, lora_b, t, keep, scaling, dropout_p, need):
    refs = (x, lora_a, lora_b)
    return tuple(r.new_empty(r.shape) if n else r.new_empty(0) for r, n in zip(refs, need, strict=True))


def _setup_context(ctx, inputs, output):
    base, x, lora_a, lora_b, keep, scaling, dropout_p = inputs
    ctx.save_for_backward(x, lora_a, lora_b, output[1], keep)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, grad_y, grad_t):
    x, lora_a, lora_b, t, keep = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[1], n[2], n[3]]
    dx, da, db = _backward_op(grad_y, x, lora_a, lora_b, t, keep, ctx.scaling, ctx.dropout_p, need)
    return (grad_y if n[0] else None, dx if need[0] else None, da if need[1] else None, db if need[2] else None,
            None, None, None)


torch.library.register_autograd("ptpeft_fast::lora_branch_forward", _backward, setup_context=_setup_context)


def _reference(base, x, lora_a, lora_b, scaling: float, dropout_p: float) -> torch.Tensor:
    xd = F.dropout(x, dropout_p) if dropout_p > 0 else x
    return base + scaling * F.linear(F.linear(xd, lora_a), lora_b)


def _validate(base, x, lora_a, lora_b, scaling, dropout_p) -> None:
    for name, t in (("base", base), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lora_branch: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"lora_branch: x must be a floating-point tensor [..., in], got {x.dtype} {tuple(x.shape)}")
    r, in_f = lora_a.shape if lora_a.dim() == 2 else (0, -1)
    if in_f != x.shape[-1] or r < 1:
        raise ValueError(f"lora_branch: lora_a must be [r, in] = [r, {x.shape[-1]}] with r >= 1, "
                         f"got {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or lora_b.shape[1] != r:
        raise ValueError(f"lora_branch: lora_b must be [out, r] with r = {r}, got {tuple(lora_b.shape)}")
    if tuple(base.shape) != tuple(x.shape[:-1]) + (lora_b.shape[0],):
        raise ValueError(f"lora_branch: base must be x's leading shape + [out] = "
                         f"{list(x.shape[:-1]) + [lora_b.shape[0]]}, got {list(base.shape)}")
    check_dtype_device("lora_branch", "x", x, (("base", base), ("lora_a", lora_a), ("lora_b", lora_b)))
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"lora_branch: scaling must be a finite float (alpha / r), got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_branch: dropout_p must be in [0, 1), got {dropout_p!r}")


def lora_branch(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """``base + scaling · (dropout(x) Aᵀ) Bᵀ`` with autograd (the gradient of ``base`` is passed on
    unchanged, so the layer that computed it does its own backward).

    Args:
        base: ``[..., out]``: the base layer's output for ``x`` (e.g. a bitsandbytes 4-bit matmul).
        x: ``[..., in]``: that layer's input.
        lora_a: ``[r, in]``; lora_b: ``[out, r]``; all four in one dtype and on one device.
        scaling: LoRA scale (``alpha / r``), a finite Python number.
        dropout_p: dropout on the branch's input (PEFT's ``lora_dropout``); pass 0 in eval mode.
        backend: ``"auto"`` or an implementation of :data:`TABLE`.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, a non-finite ``scaling`` or a
            ``dropout_p`` outside ``[0, 1)``.
    """
    _validate(base, x, lora_a, lora_b, scaling, dropout_p)
    impl = TABLE.choose(backend, _call(base, x, lora_a, lora_b, scaling, dropout_p))
    scaling, dropout_p = float(scaling), float(dropout_p)
    if impl == "torch":
        return _reference(base, x, lora_a, lora_b, scaling, dropout_p)
    keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= dropout_p if dropout_p > 0 else None
    y, _ = _forward_op(base, x, lora_a, lora_b, keep, scaling, dropout_p)
    return y
