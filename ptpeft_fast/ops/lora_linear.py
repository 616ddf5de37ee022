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

Implementations (:data:`TABLE`, first that applies under ``backend="auto"``):

- ``triton`` (CUDA): one fused kernel per direction (``kernels/lora.py``), dropout in-kernel.
- ``merged_cpp`` (CPU, fp32, the avx512 build of the extension): the merged forward; in the
  backward ``T``, ``U``, ``dA`` and ``dB`` come from one C++ op (``csrc/lora_grads_cpu.cpp``)
  that reads each block of rows of ``X`` and ``dY`` once, instead of four BLAS calls that stream
  ``X`` and ``dY`` twice each: about 2x faster for that part. Its portable builds compile and are
  tested, but measured 1.1-1.2x BLAS's time with AVX2's 16 vector registers, so ``auto`` takes it
  only from the avx512 build.
- ``merged``: the merged forward and backward above with BLAS (fp32/fp64, no dropout, N > r).
- ``separate``: the branch kept apart (half precision, dropout), backward written out.
- ``torch``: the reference, plain autograd ops.

The ops ``ptpeft_fast::lora_linear_forward`` → ``(y, T)`` and ``ptpeft_fast::lora_linear_backward``
(its autograd formula) have fake kernels: ``torch.compile`` traces a patched layer as one graph.

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
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import availability as avail
from . import dispatch
from ._autocast import in_autocast_dtype
from ._checks import check_dtype_device

__all__ = ["lora_linear", "TABLE", "LoraCall", "FACTOR_GRAD_RANKS"]

FACTOR_GRAD_RANKS = (8, 16, 24, 32)  # ranks csrc/lora_grads_cpu.cpp has kernels for

_first = dispatch.first_reason


class LoraCall(NamedTuple):
    """What the table needs to know about one call (plain values)."""

    device: str
    dtype: torch.dtype
    n: int  # rows (tokens)
    r: int
    dropout: bool
    factors_need_grad: bool  # both lora_a and lora_b


def _call(x, weight, bias, lora_a, lora_b, scaling=1.0, dropout_p=0.0, **_) -> LoraCall:
    grad = torch.is_grad_enabled()
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return LoraCall(x.device.type, x.dtype, n, lora_a.shape[0], dropout_p > 0,
                    grad and lora_a.requires_grad and lora_b.requires_grad)


def _merged_applies(c: LoraCall) -> Optional[str]:
    # half precision keeps the branch apart: rounding W' to bf16/fp16 would drop LoRA updates
    # smaller than half an ulp of W (early in training, all of them)
    return _first((c.dtype not in (torch.float32, torch.float64), f"{c.dtype} (fp32/fp64 only: W' would round)"),
                  (c.dropout, "LoRA dropout"), (c.n <= c.r, f"{c.n} rows <= rank {c.r}"))


def _merged_cpp_applies(c: LoraCall) -> Optional[str]:
    return _first((c.device != "cpu", "CPU only"), (c.dtype != torch.float32, f"{c.dtype} (fp32 only)"),
                  (c.r not in FACTOR_GRAD_RANKS, f"rank {c.r} not in {FACTOR_GRAD_RANKS}"),
                  (not c.factors_need_grad, "the factors need no gradient"),
                  (not avail.ext_op("lora_factor_grads"), "the C++ extension is unavailable")) or _merged_applies(c)


def _merged_cpp_auto(c: LoraCall) -> Optional[str]:
    return None if avail.ext_variant() == "avx512" else "slower than BLAS outside the avx512 build"


def _triton_applies(c: LoraCall) -> Optional[str]:
    return avail.triton_declines(c.device, c.dtype) or _first(
                  (c.r > 256, f"rank {c.r} > 256"))


TABLE = dispatch.Table("lora_linear", [
    dispatch.Impl("triton", _triton_applies, auto=("cuda",), summary="kernels/lora.py"),
    dispatch.Impl("merged_cpp", _merged_cpp_applies, auto=_merged_cpp_auto, summary="W + sBA; csrc/lora_grads_cpu.cpp"),
    dispatch.Impl("merged", _merged_applies, summary="W + sBA, BLAS"),
    dispatch.Impl("separate", lambda c: None, summary="branch apart, backward written out"),
    dispatch.Impl("torch", lambda c: None, summary="reference: plain autograd ops"),
])
dispatch.register(TABLE, _call)


# ----------------------------------------------------------------------------- the ops


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("ptpeft_fast::lora_linear_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, keep: Optional[torch.Tensor], seed: Optional[torch.Tensor], scaling: float,
                dropout_p: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [..., out], T)``: ``T = drop(X) Aᵀ`` where the backward reuses it, else an empty tensor."""
    x2 = _rows(x)
    out_f = weight.shape[0]
    if impl in ("merged", "merged_cpp"):
        # merged weight: the LoRA branch rides along in the one big GEMM
        y = F.linear(x2, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)
        t = x2.new_empty(0)
    elif impl == "separate":
        if keep is not None:
            t = (x2 * keep.reshape(x2.shape)) @ lora_a.t()  # the 1/(1-p) goes on the small T
            t.mul_(1.0 / (1.0 - dropout_p))
        else:
            t = x2 @ lora_a.t()
        y = F.linear(x2, weight, bias)
        y.addmm_(t, lora_b.t(), alpha=scaling)
    elif impl == "triton":
        from . import triton_ops

        y, t = triton_ops.lora_linear_forward(x2, weight, bias, lora_a, lora_b, scaling, dropout_p,
                                              int(seed.item()) if seed is not None else 0)
    else:
        raise ValueError(f"lora_linear_forward: no implementation {impl!r}")
    return y.view(*x.shape[:-1], out_f), t


@_forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, keep, seed, scaling, dropout_p, impl):
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    if impl == "separate":
        return y, x.new_empty((n, lora_a.shape[0]))
    if impl == "triton":
        return y, x.new_empty((n, lora_a.shape[0]), dtype=torch.float32)
    return y, x.new_empty(0)


@torch.library.custom_op("ptpeft_fast::lora_linear_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, t: torch.Tensor, keep: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                 scaling: float, dropout_p: float, impl: str,
                 need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, db, dA, dB)``; an input whose ``need`` is False (or an absent bias) gets an empty tensor."""
    if impl == "triton":
        from . import triton_ops

        grads = triton_ops.lora_linear_backward(_rows(grad_y), _rows(x), weight, lora_a, lora_b, t, scaling, dropout_p,
                                                int(seed.item()) if seed is not None else 0, need)
    else:
        grads = _blas_backward(grad_y, x, weight, lora_a, lora_b, t, keep, scaling, dropout_p, impl, need)
    refs = (x, weight, weight[:, 0], lora_a, lora_b)
    # contiguous, as the fake kernel promises (some gradients come out as transposed views)
    return tuple(g.reshape(r.shape).contiguous() if n and g is not None else r.new_empty(0)
                 for g, r, n in zip(grads, refs, need, strict=True))


@_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, t, keep, seed, scaling, dropout_p, impl, need):
    refs = (x, weight, weight[:, 0], lora_a, lora_b)
    return tuple(r.new_empty(r.shape) if n else r.new_empty(0) for r, n in zip(refs, need, strict=True))


def _blas_backward(grad_y, x, weight, lora_a, lora_b, t, keep, s: float, p: float, impl: str, need: list[bool]):
    need_x, need_w, need_b, need_a, need_bb = need
    x2, dy = _rows(x), grad_y.reshape(-1, weight.shape[0])
    merged = impl in ("merged", "merged_cpp")
    inv_keep = 1.0 / (1.0 - p)
    keep = None if keep is None else keep.reshape(x2.shape)
    dx = dw = db = da = dbb = None
    if impl == "merged_cpp" and need_a and need_bb and dy.stride(-1) == 1 and x2.stride(-1) == 1:
        da, dbb = torch.ops.ptpeft_fast.lora_factor_grads(x2, dy, lora_a, lora_b, s)  # both in one pass
        need_a = need_bb = False  # done: the BLAS products below are skipped
    u = dy @ lora_b if (need_a or (need_x and not merged)) else None  # [N, r]
    if need_x:
        if merged:
            dx = dy @ torch.addmm(weight, lora_b, lora_a, alpha=s)
        elif keep is None:
            dx = torch.addmm(dy @ weight, u, lora_a, alpha=s)
        else:
            dx = torch.addmm((u @ lora_a).mul_(keep), dy, weight, beta=s * inv_keep)
    if need_w:
        dw = dy.t() @ x2
    if need_b:
        db = dy.sum(0)
    # the thin GEMMs are cheapest with the r-sized operand as a contiguous left factor
    if need_a:
        xd = x2 if keep is None else x2 * keep
        da = (u.t().contiguous() @ xd).mul_(s if keep is None else s * inv_keep)
    if need_bb:
        if t.numel() == 0:
            t = x2 @ lora_a.t()
        dbb = (t.t().contiguous() @ dy).mul_(s).t()
    return dx, dw, db, da, dbb


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, keep, seed, scaling, dropout_p, impl = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], keep, seed)
    ctx.scaling, ctx.dropout_p, ctx.impl, ctx.has_bias = scaling, dropout_p, impl, bias is not None


def _backward(ctx, grad_y, grad_t):
    x, weight, lora_a, lora_b, t, keep, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], n[2] and ctx.has_bias, n[3], n[4]]
    dx, dw, db, da, dbb = _backward_op(grad_y, x, weight, lora_a, lora_b, t, keep, seed, ctx.scaling, ctx.dropout_p,
                                      ctx.impl, need)
    grads = [g if k else None for g, k in zip((dx, dw, db, da, dbb), need, strict=True)]
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("ptpeft_fast::lora_linear_forward", _backward, setup_context=_setup_context)


def _reference(x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float) -> torch.Tensor:
    """The ``"torch"`` entry: plain autograd ops (dropout by ``F.dropout``, torch's generator)."""
    xd = F.dropout(x, dropout_p) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(xd, lora_a), lora_b)


# ----------------------------------------------------------------------------- public op


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
    check_dtype_device("lora_linear", "x", x,
                       (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)))
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
        backend: ``"auto"`` or an implementation of :data:`TABLE` (``"torch"``: the reference).

    Returns:
        ``[..., out]`` in ``x``'s dtype; inside ``torch.autocast`` in the autocast dtype (the
        operands are cast to it, as for ``nn.Linear``).

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, a non-finite ``scaling`` or a
            ``dropout_p`` outside ``[0, 1)``.
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    impl = TABLE.choose(backend, _call(x, weight, bias, lora_a, lora_b, scaling, dropout_p))
    scaling, dropout_p = float(scaling), float(dropout_p)
    if impl == "torch":
        return _reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    keep = seed = None
    if dropout_p > 0:
        if impl == "triton":
            seed = torch.randint(0, 2**30, (1,), dtype=torch.int64)
        else:  # rand >= p: bernoulli's distribution at about half its CPU cost
            keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= dropout_p
    y, _ = _forward_op(x, weight, bias, lora_a, lora_b, keep, seed, scaling, dropout_p, impl)
    return y
