r"""The LM head and its cross-entropy in one op, without the ``[N, V]`` logits.

``loss = CE(softcap(hidden Wᵀ + b), labels)`` over the tokens whose label is not
``ignore_index``; ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``labels [N]``
(already aligned with ``hidden``: no shift inside). ``softcap(z) = c · tanh(z / c)`` when
``softcap = c`` is given (Gemma 2/3's ``final_logit_softcapping``). Reductions: ``"mean"`` over
the supervised tokens (0 when there are none, with zero gradients, where ``F.cross_entropy``
gives NaN), ``"sum"``, ``"none"`` (``[N]``, 0 at ignored tokens). The loss is float32 for fp32/bf16/fp16
inputs (transformers upcasts the logits the same way), float64 for float64 ones.

Write ``z_i = softcap(h_i Wᵀ + b)`` for a supervised token ``i`` with label ``y_i`` and
``p_i = softmax(z_i)``. Then::

    loss_i  = logsumexp(z_i) - z_i[y_i]
    dz_i    = w_i (p_i - onehot(y_i))              w_i: 1/n (mean), 1 (sum), the output grad (none)
    draw_i  = dz_i ∘ (1 - (z_i / c)²)              through the softcap (draw_i = dz_i without one)
    dh_i    = draw_i W                             [H]
    dW      = Σ_i draw_iᵀ h_i                      only when the weight requires grad
    db      = Σ_i draw_i                           only when the bias requires grad

Ignored tokens are dropped first; the rest run in chunks of rows whose ``[rows, V]`` logits fit
in :data:`LOGITS_CHUNK_BYTES` (at least :data:`MIN_CHUNK_ROWS` rows, with vocabulary chunks and an
online log-sum-exp when even those would not fit in :data:`MAX_CHUNK_FACTOR` budgets). As the
loss is the last op of a step, the gradients are computed in the forward while each chunk's
logits are at hand (as Liger-Kernel does) and the backward only scales them by
the output gradient; ``reduction="none"`` with a trainable head recomputes them in the backward
instead (its per-token output gradients weight ``dW``). A frozen head allocates no ``dW``.

Implementations (:data:`TABLE`, first that applies under ``backend="auto"``):

- ``triton`` (CUDA): the chunk GEMMs by torch, the row-wise softmax, loss and gradient of each
  logits chunk by one Triton kernel, in place (``kernels/cross_entropy.py``).
- ``chunked``: the same in torch ops (every device; fp32 math on the chunk).
- ``torch``: the reference, materialising the logits (the specification).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import availability as avail
from . import dispatch
from ._checks import check_dtype_device
from .precision import accumulation_dtype

__all__ = ["linear_cross_entropy", "TABLE", "CrossEntropyCall", "LOGITS_CHUNK_BYTES", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
#: fp32 logits held at once per chunk, the op's working memory beyond its inputs and gradients ...
LOGITS_CHUNK_BYTES = 32 << 20
#: ... but never fewer rows than this per chunk: thin chunks make the head's GEMMs slow (32 rows at
#: V = 262144 took 1.6x the time of 128), so a large vocabulary takes up to 8x the budget ...
MIN_CHUNK_ROWS = 128
#: ... beyond which the vocabulary is split into chunks with an online log-sum-exp
MAX_CHUNK_FACTOR = 8

_first = dispatch.first_reason


class CrossEntropyCall(NamedTuple):
    """What the table needs to know about one call (plain values)."""

    device: str
    dtype: torch.dtype
    n: int
    vocab: int
    weight_grad: bool


def _call(hidden, weight, labels, bias=None, **_) -> CrossEntropyCall:
    grad = torch.is_grad_enabled()
    return CrossEntropyCall(hidden.device.type, hidden.dtype, hidden.shape[0], weight.shape[0],
                            grad and (weight.requires_grad or (bias is not None and bias.requires_grad)))


def _triton_applies(c: CrossEntropyCall) -> Optional[str]:
    return avail.triton_declines(c.device, c.dtype)


TABLE = dispatch.Table("linear_cross_entropy", [
    dispatch.Impl("triton", _triton_applies, auto=("cuda",), summary="chunk GEMMs + kernels/cross_entropy.py"),
    dispatch.Impl("chunked", lambda c: None, summary="row (and vocabulary) chunks in torch ops"),
    dispatch.Impl("torch", lambda c: None, summary="reference: the full logits, plain autograd ops"),
])
dispatch.register(TABLE, lambda hidden, weight, labels, **kw: _call(hidden, weight, labels, **kw))


# ----------------------------------------------------------------------------- the chunk math


def _chunk_sizes(n: int, vocab: int) -> tuple[int, int]:
    """(rows, vocabulary columns) per chunk: as many rows as the budget holds with the whole
    vocabulary, at least :data:`MIN_CHUNK_ROWS` (within :data:`MAX_CHUNK_FACTOR` budgets), else that
    many rows and a vocabulary chunk of the widened budget."""
    budget = max(LOGITS_CHUNK_BYTES // 4, 1)
    rows = max(budget // max(vocab, 1), MIN_CHUNK_ROWS)
    if rows * vocab <= MAX_CHUNK_FACTOR * budget:
        return max(min(rows, n), 1), vocab
    return max(min(MIN_CHUNK_ROWS, n), 1), max(MAX_CHUNK_FACTOR * budget // MIN_CHUNK_ROWS, 1)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int, v1: int,
            softcap: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits (fp32, fp64 for fp64 inputs) of rows ``h`` over vocabulary ``[v0, v1)``, and the
    softcap's tanh (None without)."""
    w = weight[v0:v1]
    z = F.linear(h, w, None if bias is None else bias[v0:v1]).to(accumulation_dtype(h.dtype))
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _rowwise_grad_(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, v0: int, scale: torch.Tensor,
                   tanh: Optional[torch.Tensor]) -> torch.Tensor:
    """``z`` (fp32 logits of a chunk) overwritten with ``scale · (softmax - onehot)`` through the softcap."""
    z.sub_(lse[:, None]).exp_()
    inside = (targets >= v0) & (targets < v0 + z.shape[1])
    rows = inside.nonzero().squeeze(1)
    if rows.numel():
        z[rows, targets[rows] - v0] -= 1.0
    z.mul_(scale[:, None])
    if tanh is not None:
        z.mul_(1.0 - tanh * tanh)
    return z


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           labels: torch.Tensor, ignore_index: int, softcap: Optional[float], reduction: str,
                           need: tuple[bool, bool, bool], row_scale: Optional[torch.Tensor] = None,
                           row_kernel=None):
    """``(loss, dh, dW, db)`` of the whole call, chunk by chunk (see the module docstring).

    ``need``: which of ``dh, dW, db`` to compute (an empty tensor where not). ``row_scale``: the
    per-token output gradient (``reduction="none"`` recomputed in the backward); otherwise the
    gradients are those of the loss itself. ``row_kernel(z, targets, scale) -> (lse, target_logit)``
    replaces the torch row math on single-vocabulary-chunk calls (the Triton implementation).
    """
    N, V = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    valid = (labels != ignore_index).nonzero().squeeze(1)
    n = valid.numel()
    losses = torch.zeros(N, dtype=acc, device=hidden.device)
    need_h, need_w, need_b = need
    dh = torch.zeros_like(hidden, dtype=acc) if need_h else hidden.new_empty(0)
    dw = torch.zeros_like(weight, dtype=acc) if need_w else weight.new_empty(0)
    db = torch.zeros(V, dtype=acc, device=hidden.device) if need_b else weight.new_empty(0)
    any_grad = need_h or need_w or need_b
    if n:
        if row_scale is not None:
            scales = row_scale.to(acc).index_select(0, valid)
        else:
            scales = torch.full((n,), 1.0 / n if reduction == "mean" else 1.0, dtype=acc, device=hidden.device)
        rows, cols = _chunk_sizes(n, V)
        for r0 in range(0, n, rows):
            idx = valid[r0:r0 + rows]
            h, y, s = hidden.index_select(0, idx), labels.index_select(0, idx), scales[r0:r0 + rows]
            if cols >= V:
                z, tanh = _logits(h, weight, bias, 0, V, softcap)
                if row_kernel is not None and tanh is None:
                    lse, zy = row_kernel(z, y, s if any_grad else None)
                else:
                    lse = torch.logsumexp(z, dim=1)
                    zy = z.gather(1, y[:, None]).squeeze(1)
                    if any_grad:
                        _rowwise_grad_(z, lse, y, 0, s, tanh)
                losses[idx] = lse - zy
                if any_grad:
                    _accumulate(z, h, idx, weight, 0, V, dh, dw, db)
                continue
            # vocabulary chunks: an online log-sum-exp first, then the gradients chunk by chunk
            m = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
            sumexp = torch.zeros_like(m)
            zy = torch.zeros_like(m)
            for v0 in range(0, V, cols):
                z, _ = _logits(h, weight, bias, v0, min(v0 + cols, V), softcap)
                m_new = torch.maximum(m, z.amax(dim=1))
                sumexp = sumexp * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
                m = m_new
                inside = (y >= v0) & (y < v0 + z.shape[1])
                zy = torch.where(inside, z.gather(1, (y - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), zy)
            lse = m + torch.log(sumexp)
            losses[idx] = lse - zy
            if any_grad:
                for v0 in range(0, V, cols):
                    v1 = min(v0 + cols, V)
                    z, tanh = _logits(h, weight, bias, v0, v1, softcap)
                    _accumulate(_rowwise_grad_(z, lse, y, v0, s, tanh), h, idx, weight, v0, v1, dh, dw, db)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum()
        if reduction == "mean" and n:
            loss = loss / n
    return loss, _cast(dh, hidden), _cast(dw, weight), _cast(db, weight)


def _cast(grad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return grad.to(ref.dtype) if grad.numel() else grad


def _accumulate(d: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, v0: int, v1: int,
                dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor) -> None:
    """Add one chunk's ``d = ∂loss/∂logits`` (fp32 ``[rows, v1 - v0]``) into the gradients."""
    dd = d.to(weight.dtype)
    if dh.numel():
        dh.index_add_(0, idx, (dd @ weight[v0:v1]).to(dh.dtype))
    if dw.numel():
        dw[v0:v1] += (dd.t() @ h).to(dw.dtype)
    if db.numel():
        db[v0:v1] += d.sum(dim=0)


# ----------------------------------------------------------------------------- the ops


def _row_kernel(impl: str):
    if impl != "triton":
        return None
    from . import triton_ops

    return triton_ops.cross_entropy_rows_


@torch.library.custom_op("ptpeft_fast::linear_cross_entropy_forward", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                ignore_index: int, softcap: Optional[float], reduction: str, impl: str,
                need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dh, dW, db)``: the gradients ``need`` asks for, of the loss itself (the backward
    scales them), or empty tensors where they are recomputed in the backward (:func:`_recompute`)."""
    now = [False] * 3 if _recompute(reduction, need) else need
    return chunked_loss_and_grads(hidden, weight, bias, labels, ignore_index, softcap, reduction,
                                  (now[0], now[1], now[2]), row_kernel=_row_kernel(impl))


def _recompute(reduction: str, need: list[bool]) -> bool:
    """Per-token output gradients weight ``dW`` and ``db``: then everything waits for the backward."""
    return reduction == "none" and (need[1] or need[2])


@_forward_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, reduction, impl, need):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=accumulation_dtype(hidden.dtype))
    now = [False] * 3 if _recompute(reduction, need) else need
    return (loss, hidden.new_empty(hidden.shape) if now[0] else hidden.new_empty(0),
            weight.new_empty(weight.shape) if now[1] else weight.new_empty(0),
            weight.new_empty((weight.shape[0],)) if now[2] else weight.new_empty(0))


@torch.library.custom_op("ptpeft_fast::linear_cross_entropy_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, ignore_index: int, softcap: Optional[float], reduction: str, impl: str,
                 need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reduction="none"`` with a trainable head: ``(dh, dW, db)`` recomputed, weighted by ``grad_loss``."""
    _, dh, dw, db = chunked_loss_and_grads(hidden, weight, bias, labels, ignore_index, softcap, reduction,
                                           (need[0], need[1], need[2]), row_scale=grad_loss)
    return dh, dw, db


@_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, ignore_index, softcap, reduction, impl, need):
    return (hidden.new_empty(hidden.shape) if need[0] else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need[1] else weight.new_empty(0),
            weight.new_empty((weight.shape[0],)) if need[2] else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, softcap, reduction, impl, need = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)  # only kept for the backward
    ctx.recompute = _recompute(reduction, need)
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(dh, dw, db)
    ctx.args = (ignore_index, softcap, reduction, impl, list(need))


def _backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    ignore_index, softcap, reduction, impl, need = ctx.args
    if ctx.recompute:
        hidden, weight, bias, labels = ctx.saved_tensors
        dh, dw, db = _backward_op(grad_loss, hidden, weight, bias, labels, ignore_index, softcap, reduction, impl,
                                  need)
    else:
        dh, dw, db = ctx.saved_tensors
        # the precomputed gradients are those of the loss itself: scale by its output gradient
        scale = grad_loss[:, None] if reduction == "none" else grad_loss
        dh = dh * scale.to(dh.dtype) if dh.numel() else dh
        dw = dw * grad_loss.to(dw.dtype) if dw.numel() else dw
        db = db * grad_loss.to(db.dtype) if db.numel() else db
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 6


torch.library.register_autograd("ptpeft_fast::linear_cross_entropy_forward", _backward, setup_context=_setup_context)


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", softcap: Optional[float] = None) -> torch.Tensor:
    """The ``"torch"`` entry and the specification: the full fp32 logits and ``F.cross_entropy``."""
    z = F.linear(hidden, weight, bias).to(accumulation_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if reduction == "mean":
        n = (labels != ignore_index).sum()
        total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
        return total / n.clamp_min(1)  # no supervised token: 0, not F.cross_entropy's NaN
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------- public op


def _validate(hidden, weight, labels, bias, ignore_index, reduction, softcap) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden must be a floating [N, H] tensor, got {hidden.dtype} "
                         f"{tuple(hidden.shape)} (flatten batch and sequence first)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, H] = [V, {hidden.shape[1]}], got "
                         f"{tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0] or labels.dtype not in (torch.long, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be integer [N] = [{hidden.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"linear_cross_entropy: bias must be [V] = [{weight.shape[0]}] or None")
    check_dtype_device("linear_cross_entropy", "hidden", hidden, (("weight", weight), ("bias", bias)))
    if labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: labels are on {labels.device} but hidden on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; choose one of {REDUCTIONS}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"linear_cross_entropy: softcap must be a positive finite number or None, got {softcap!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``labels``, without the logits.

    Args:
        hidden: ``[N, H]`` (the last hidden states of the tokens, flattened).
        weight: ``[V, H]`` the LM head (tied or not; frozen or trainable).
        labels: ``[N]`` integer targets aligned with ``hidden`` (shift them yourself for a causal LM).
        bias: ``[V]`` or None.
        ignore_index: label of tokens without a loss.
        reduction: ``"mean"`` over the supervised tokens (0 if none), ``"sum"``, or ``"none"`` (``[N]``).
        softcap: ``c`` for ``c · tanh(z / c)`` on the logits, or None.
        backend: ``"auto"`` or an implementation of :data:`TABLE` (``"torch"``: the reference).

    Returns:
        The float32 loss (a scalar, or ``[N]`` for ``"none"``).

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, or a bad reduction / softcap.
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction, softcap)
    labels = labels.long()
    softcap = None if softcap is None else float(softcap)
    impl = TABLE.choose(backend, _call(hidden, weight, labels, bias))
    if impl == "torch":
        return reference(hidden, weight, labels, bias, ignore_index, reduction, softcap)
    grad = torch.is_grad_enabled()
    need = [grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad]
    loss, _, _, _ = _forward_op(hidden, weight, bias, labels, int(ignore_index), softcap, reduction, impl, need)
    return loss
