r"""LoRA linear: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with ``A [r, in]``, ``B [out, r]``.

One autograd Function, shaped for the usual PT-PEFT case (``W`` frozen, ``x`` needing
grad, ``N = tokens >> r``). Write ``X`` for ``x`` flattened to ``[N, in]``, ``dY`` for the
output gradient ``[N, out]``, ``X̃ = drop(X) = X ∘ keep / (1 - p)`` and ``T = X̃ Aᵀ [N, r]``.

Forward::

    p == 0, N > r, fp32/64:  W' = W + s B A        (out·in·r flops, tiny)
                             Y  = X W'ᵀ + b        (one addmm: the LoRA branch is free)
    otherwise:               Y  = X Wᵀ + b;  Y += s T Bᵀ   (addmm, then addmm_ in place)

Backward::

    U   = dY B                         [N, r]
    dX  = dY W'                        (merged: one GEMM with the merged weight)
        = dY W + s/(1-p) · keep ∘ (U A)  (otherwise; keep = 1 without dropout)
    dA  = s Uᵀ X̃                       [r, in]
    dB  = s dYᵀ T                      [out, r]
    dW  = dYᵀ X     only when W requires grad (never computed for a frozen W)
    db  = Σ_rows dY only when b requires grad

On CPU in fp32, for the merged case with ranks 8–32 and both factors needing gradients,
``T``, ``U``, ``dA`` and ``dB`` come from one C++ op (``csrc/lora_grads_cpu.cpp``) that reads
each block of rows of ``X`` and ``dY`` once, instead of four BLAS calls that stream ``X`` and
``dY`` twice each (MKL runs these r-wide GEMMs far below its square-GEMM rate): about 2x faster
for that part.

Saved: ``x`` (the caller's tensor, no copy), the factors, ``T`` when it was computed anyway
(``[N, r]``) and, with dropout, the bool keep-mask (1 byte per element of ``x``: regenerating
it in backward would cost a second RNG pass, the dominant cost of dropout on CPU). ``X̃``
is recomputed as ``X ∘ keep`` and the ``1/(1-p)`` is applied to the small ``[N, r]`` /
``[r, in]`` factors. ``W'`` is recomputed in backward rather than kept (it is ``W``-sized).
The keep-mask is ``rand >= p`` from torch's default generator, so ``torch.manual_seed``
makes dropout reproducible.
Half precision runs in the input dtype; CPU GEMMs accumulate in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import cpu_ext_op, resolve_backend, try_kernel
from ._autocast import in_autocast_dtype
from ._checks import check_dtype_device

__all__ = ["lora_linear"]


def _dropout_keep(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool keep-mask (True = kept) for dropout probability ``p``, from torch's default generator.

    ``rand >= p`` rather than ``bernoulli_``: same distribution, about twice as fast on CPU.
    """
    return torch.rand(shape, dtype=torch.float32, device=device) >= p


def _merge(x: torch.Tensor, p: float, n: int, r: int) -> bool:
    """Use the merged weight ``W + s B A``: no dropout, more tokens than rank, and fp32/fp64.

    Half precision keeps the branch separate: rounding ``W'`` to bf16/fp16 would drop LoRA
    updates smaller than half an ulp of ``W`` (early in training, all of them).
    """
    return p == 0.0 and n > r and x.dtype in (torch.float32, torch.float64)


def _factor_grads_op(x2: torch.Tensor, r: int):
    """The fused ``(dA, dB)`` op of ``csrc/lora_grads_cpu.cpp`` when it applies, else None."""
    if x2.device.type != "cpu" or x2.dtype != torch.float32 or r % 8 or not 8 <= r <= 32:
        return None
    return cpu_ext_op("lora_factor_grads")


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float):  # type: ignore[override]
        in_f = x.shape[-1]
        out_f, r = weight.shape[0], lora_a.shape[0]
        x2 = x.reshape(-1, in_f)
        n = x2.shape[0]
        keep = t = None
        if _merge(x, dropout_p, n, r):
            # merged weight: the LoRA branch rides along in the one big GEMM
            y = F.linear(x2, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)
        else:
            if dropout_p > 0.0:
                keep = _dropout_keep(x2.shape, dropout_p, x.device)
                t = (x2 * keep) @ lora_a.t()  # the 1/(1-p) goes on the small T
                t.mul_(1.0 / (1.0 - dropout_p))
            else:
                t = x2 @ lora_a.t()
            y = F.linear(x2, weight, bias)
            y.addmm_(t, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, t, keep)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, lora_a, lora_b, t, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        in_f, out_f = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, in_f)
        dy = grad_y.reshape(-1, out_f)
        n, r = x2.shape[0], lora_a.shape[0]
        merged = _merge(x, p, n, r)
        inv_keep = 1.0 / (1.0 - p)

        dx = dw = db = da = dbb = None
        fused = _factor_grads_op(x2, r) if (merged and need_a and need_bb) else None
        if fused is not None and dy.stride(-1) == 1 and x2.stride(-1) == 1:
            da, dbb = fused(x2, dy, lora_a, lora_b, s)  # both factor gradients in one pass
            need_a = need_bb = False  # done: the BLAS products below are skipped

        u = dy @ lora_b if (need_a or (need_x and not merged)) else None  # [N, r]

        if need_x:
            if merged:
                dx = dy @ torch.addmm(weight, lora_b, lora_a, alpha=s)
            elif keep is None:
                dx = torch.addmm(dy @ weight, u, lora_a, alpha=s)
            else:
                dx = torch.addmm((u @ lora_a).mul_(keep), dy, weight, beta=s * inv_keep)
            dx = dx.view(x.shape)
        if need_w:
            dw = dy.t() @ x2
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        # the thin GEMMs are cheapest with the r-sized operand as a contiguous left factor
        if need_a:
            xd = x2 if keep is None else x2 * keep
            da = (u.t().contiguous() @ xd).mul_(s if keep is None else s * inv_keep)
        if need_bb:
            if t is None:
                t = x2 @ lora_a.t()
            dbb = (t.t().contiguous() @ dy).mul_(s).t()
        return dx, dw, db, da, dbb, None, None


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"lora_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"lora_linear: x must be floating point, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension (features last)")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features but weight is [out, in] = {list(weight.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f or lora_a.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_a must be [r, in] = [r, {in_f}] with r >= 1, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"lora_linear: lora_b must be [out, r] = [{out_f}, {r}], got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias must be [out] = [{out_f}], got {tuple(bias.shape)}")
    check_dtype_device("lora_linear", "x", x, (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)))
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be a finite float (alpha / r), got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")


@in_autocast_dtype
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with autograd.

    Args:
        x: ``[..., in]`` input.
        weight: ``[out, in]`` base weight (usually frozen: then no ``dW`` is computed).
        bias: ``[out]`` or None.
        lora_a: ``[r, in]``; lora_b: ``[out, r]``.
        scaling: LoRA scale (``alpha / r``), a finite Python number.
        dropout_p: dropout on the LoRA branch input only (as PEFT's ``lora_dropout``);
            pass 0 in eval mode.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., out]`` in ``x``'s dtype; inside ``torch.autocast`` in the autocast dtype (the
        operands are cast to it, as for ``nn.Linear``).

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, a non-finite ``scaling`` or a
            ``dropout_p`` outside ``[0, 1)``.
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    chosen = resolve_backend("lora_linear", backend, x, weight, bias, lora_a, lora_b)
    if chosen == "triton":
        from . import triton_ops

        out = try_kernel(backend, lambda: triton_ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p))
        if out is not None:
            return out
    return _LoraLinearFn.apply(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p))
