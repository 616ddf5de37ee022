"""Triton implementations of the ptpeft_fast ops: thin autograd wrappers over ``ptpeft_fast.kernels``.

The public ops in :mod:`ptpeft_fast.ops` call these when ``resolve_backend`` returns
``"triton"``; they take the same arguments as the public ops minus ``backend``. They run on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run them).

Limits (each raises :class:`TritonUnsupported`, a ``ValueError``, naming the alternative):

- ``prefix_attention``: ``attn_mask`` must be exactly "key padding (one contiguous run of visible real keys per
  sequence: left or right padding) with or without bottom-right causality", as a bool mask
  or an additive float mask whose entries are all 0 or -inf/dtype-min. Such masks become
  per-sequence ``[klo, khi)`` ranges for the kernel (:mod:`.mask_ranges`); any other mask
  (sliding windows, ALiBi-style biases, per-head patterns) is refused. The dispatch table asks
  the same question first, so such a call runs ``chunked``.
- head dim <= 256.

Dropout (attention probabilities, LoRA input) runs in-kernel from a Philox seed drawn from
torch's generator; masks are regenerated in the backward, never stored.
- ``adapter``: bottleneck <= 256.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

from ptpeft_fast.kernels import adapter as _adk
from ptpeft_fast.kernels import cross_entropy as _cek
from ptpeft_fast.kernels import lora as _lk
from ptpeft_fast.kernels import prefix_attention as _pak

from . import mask_ranges
from .dispatch import BackendUnsupported
from .documents import token_bounds

__all__ = [
    "TritonUnsupported",
    "adapter_backward",
    "adapter_forward",
    "attention_dropout_mask",
    "cross_entropy_rows_",
    "lora_dropout_mask",
    "lora_linear_backward",
    "lora_linear_forward",
    "mask_to_key_range",
    "poison_outputs",
    "prefix_attention_backward",
    "prefix_attention_forward",
]

MAX_HEAD_DIM = 256
MAX_BOTTLENECK = 256


class TritonUnsupported(BackendUnsupported):
    """The Triton path does not handle these arguments; ``backend="torch"`` does."""


# ----------------------------------------------------------------------------- outputs

_poison: list[bool] = [False]


@contextlib.contextmanager
def poison_outputs(on: bool = True) -> Iterator[None]:
    """Inside the block, kernel outputs start as NaN instead of uninitialised memory.

    Tests use it so that an element a kernel forgets to write fails the comparison.
    """
    _poison.append(on)
    try:
        yield
    finally:
        _poison.pop()


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _poison[-1]:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_like(t: torch.Tensor) -> torch.Tensor:
    return _new(t.shape, t.dtype, t.device)


# ----------------------------------------------------------------------- masks → ranges


def mask_to_key_range(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int,
                      k_len: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`ptpeft_fast.ops.mask_ranges.mask_to_key_range`, raising :class:`TritonUnsupported`."""
    return _key_range(attn_mask, batch, heads, q_len, k_len)[:3]


def _key_range(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int):
    try:
        return mask_ranges.key_range(attn_mask, batch, heads, q_len, k_len)
    except mask_ranges.MaskNotRanges as e:
        raise TritonUnsupported(str(e)) from None


# ------------------------------------------------------------------- prefix attention


def _key_ranges(attn_mask, B: int, H: int, L: int, S: int, causal: bool):
    """``(klo, khi, causal)`` for the kernel: None ranges when nothing is padded."""
    if attn_mask is None:
        return None, None, bool(causal)
    if attn_mask.requires_grad:
        raise TritonUnsupported("backend='triton' does not differentiate through attn_mask; use backend='torch'")
    klo, khi, causal, unpadded = _key_range(attn_mask, B, H, L, S)
    return (None, None, causal) if unpadded else (klo, khi, causal)


def _check_prefix_attention(q: torch.Tensor) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise TritonUnsupported(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {q.dtype} is not supported (fp16, bf16, fp32)")


def _bounds(cu_seqlens, attn_mask, B: int, H: int, L: int, S: int, causal: bool, dropout_p: float):
    """``(klo, khi, causal, varlen)`` for the kernels: per-sequence key ranges, or with
    ``cu_seqlens`` (packed documents) per-token document bounds."""
    if cu_seqlens is None:
        return (*_key_ranges(attn_mask, B, H, L, S, causal), False)
    if B != 1 or L != S or attn_mask is not None or not causal:
        raise TritonUnsupported("packed documents need one row, no cache, no attn_mask and causal=True")
    if dropout_p > 0:
        raise TritonUnsupported("packed documents with attention dropout: use backend='chunked'")
    doc_lo, doc_hi = token_bounds(cu_seqlens, L)
    return doc_lo, doc_hi, True, True


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal: bool, scale: float, dropout_p: float,
                             seed: int, cu_seqlens: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,L,D], lse [B,H,L] fp32)`` of the Triton flash kernel over [prefix ; real keys].

    Shapes: q ``[B,H,L,D]``; k, v ``[B,Hkv,S,D]``; prefix ``[Hkv,P,D]`` (shared by the batch) or
    ``[B,Hkv,P,D]``, all of q's dtype. The prefix is always visible; real keys follow
    ``attn_mask`` if given, else bottom-right causality if ``causal``, else all. ``dropout_p > 0``
    drops attention probabilities with an in-kernel RNG keyed by ``seed``; the keep mask is
    :func:`attention_dropout_mask` ``(B, H, L, P + S, dropout_p, seed)``, regenerated in the backward.
    ``cu_seqlens`` (int32 ``[n_docs + 1]``, B = 1): packed documents, each causal within itself
    (:mod:`ptpeft_fast.ops.documents`).
    Raises :class:`TritonUnsupported` for unsupported masks, dtypes or head dim > 256.
    """
    _check_prefix_attention(q)
    B, H, L, D = q.shape
    klo, khi, causal, varlen = _bounds(cu_seqlens, attn_mask, B, H, L, k.shape[2], causal, dropout_p)
    out = _new((B, H, L, D), q.dtype, q.device)
    lse2 = _new((B, H, L), torch.float32, q.device)
    _pak.attn_forward(q, k, v, prefix_k, prefix_v, out, lse2, klo, khi, causal=causal, scale=scale,
                      dropout_p=dropout_p, seed=seed, varlen=varlen)
    return out, lse2


def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal: bool, scale: float,
                              dropout_p: float, seed: int, cu_seqlens: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` for :func:`prefix_attention_forward`'s ``(out, lse)``."""
    B, H, L, D = q.shape
    klo, khi, causal, varlen = _bounds(cu_seqlens, attn_mask, B, H, L, k.shape[2], causal, dropout_p)
    dq, dk, dv, dpk, dpv = (_new_like(t) for t in (q, k, v, prefix_k, prefix_v))
    _pak.attn_backward(q, k, v, prefix_k, prefix_v, out, grad_out, lse, klo, khi, dq, dk, dv, dpk, dpv,
                       causal=causal, scale=scale, dropout_p=dropout_p, seed=seed, varlen=varlen)
    return dq, dk, dv, dpk, dpv


def attention_dropout_mask(
    B: int, H: int, L: int, n_keys: int, dropout_p: float, seed: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """The keep mask (bool ``[B,H,L,P+S]``, prefix columns first) ``prefix_attention`` uses for ``seed``."""
    return _pak.dropout_keep_mask(B, H, L, n_keys, dropout_p, seed, torch.device(device))


# ------------------------------------------------------------------------------ LoRA




def _check_lora(x: torch.Tensor, lora_a: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {x.dtype} is not supported (fp16, bf16, fp32)")
    if lora_a.shape[0] > 256:
        raise TritonUnsupported(f"LoRA rank {lora_a.shape[0]} > 256 is not supported by the fused kernel")


def lora_linear_forward(x2, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y [M, out], T [M, r] fp32)`` of ``x2 Wᵀ + b + scaling · (dropout(x2) Aᵀ) Bᵀ`` in one kernel.

    x2 ``[M, in]``, weight ``[out, in]``, lora_a ``[r, in]``, lora_b ``[out, r]``, one dtype.
    Dropout (``dropout_p > 0``) uses an in-kernel RNG seeded by ``seed``; the keep mask of x2 is
    :func:`lora_dropout_mask` ``((M, in), dropout_p, seed)``, regenerated in the backward.
    """
    _check_lora(x2, lora_a)
    M, N, r = x2.shape[0], weight.shape[0], lora_a.shape[0]
    y = _new((M, N), x2.dtype, x2.device)
    t = _new((M, r), torch.float32, x2.device)
    _lk.lora_forward(x2, weight, bias, lora_a, lora_b, y, t, scaling=scaling, dropout_p=dropout_p, seed=seed)
    return y, t


def lora_linear_backward(dy2, x2, weight, lora_a, lora_b, t, scaling: float, dropout_p: float, seed: int,
                         need: list[bool]) -> tuple[Optional[torch.Tensor], ...]:
    """``(dX, dW, db, dA, dB)`` (None where ``need`` is False) for :func:`lora_linear_forward`."""
    need_x, need_w, need_b, need_a, need_lb = need
    dx = dw = db = da = dlb = None
    u = _new((dy2.shape[0], lora_a.shape[0]), torch.float32, dy2.device)
    if need_x or need_a:  # u = s·dY B feeds dA; the same kernel writes dX
        dx = _new(x2.shape, x2.dtype, x2.device) if need_x else None
        _lk.lora_backward_dx(dy2, weight, lora_a, lora_b, dx, u, scaling=scaling, dropout_p=dropout_p, seed=seed)
    if need_a or need_lb:
        da = _new(lora_a.shape, lora_a.dtype, lora_a.device)
        dlb = _new(lora_b.shape, lora_b.dtype, lora_b.device)
        _lk.lora_backward_ab(x2, dy2, t, u, da, dlb, scaling=scaling, dropout_p=dropout_p, seed=seed)
    if need_w:
        # dW = dYᵀX is a plain GEMM with nothing to fuse: cuBLAS is the right tool.
        dw = (dy2.t() @ x2).to(weight.dtype)
    if need_b:
        db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype)
    return dx, dw, db, (da if need_a else None), (dlb if need_lb else None)


def lora_dropout_mask(shape: tuple[int, int], dropout_p: float, seed: int,
                      device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The keep-mask (bool ``[M, in]``) that ``lora_linear`` uses for ``seed`` (for tests)."""
    return _lk.dropout_mask(shape, dropout_p, seed, torch.device(device))


# ---------------------------------------------------------------------------- Adapter

_ACTS = {"relu": 0, "gelu": 1, "silu": 2}


def _check_adapter(x: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {x.dtype} is not supported (fp16, bf16, fp32)")
    if down_weight.shape[0] > MAX_BOTTLENECK:
        raise TritonUnsupported(f"bottleneck {down_weight.shape[0]} > {MAX_BOTTLENECK} does not fit on chip; "
                                "use backend='torch'")
    if up_weight.shape[0] != x.shape[-1]:
        raise TritonUnsupported("the Triton adapter needs d_out == d (up_weight [d, bottleneck])")


def adapter_forward(x2, down_weight, down_bias, up_weight, up_bias, activation: str,
                    residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y [M, d], Z [M, h] fp32)`` of ``x2 + up(act(down(x2)))`` (no ``x2 +`` without ``residual``)
    in one kernel; act relu|gelu (exact, erf)|silu; h <= 256 stays on chip."""
    _check_adapter(x2, down_weight, up_weight)
    M, d = x2.shape
    y = _new((M, d), x2.dtype, x2.device)
    z = _new((M, down_weight.shape[0]), torch.float32, x2.device)
    _adk.adapter_forward(x2, down_weight, down_bias, up_weight, up_bias, y, z, act=_ACTS[activation], residual=residual)
    return y, z


def adapter_backward(dy2, x2, down_weight, up_weight, z, activation: str, residual: bool,
                     need: list[bool]) -> tuple[Optional[torch.Tensor], ...]:
    """``(dX, dWd, dbd, dWu, dbu)`` (None where ``need`` is False) for :func:`adapter_forward`."""
    act = _ACTS[activation]
    dx = _new(x2.shape, x2.dtype, x2.device)
    dz = _new(z.shape, torch.float32, z.device)
    _adk.adapter_backward_dx(dy2, down_weight, up_weight, z, dx, dz, act=act, residual=residual)
    dwd = dbd = dwu = dbu = None
    if any(need[1:5]):
        dwd = _new(down_weight.shape, down_weight.dtype, down_weight.device)
        dwu = _new(up_weight.shape, up_weight.dtype, up_weight.device)
        dbd32 = _new((down_weight.shape[0],), torch.float32, down_weight.device)
        dbu32 = _new((up_weight.shape[0],), torch.float32, up_weight.device)
        _adk.adapter_backward_w(x2, dy2, z, dz, dwd, dwu, dbd32, dbu32, act=act)
        dbd, dbu = dbd32.to(down_weight.dtype), dbu32.to(up_weight.dtype)
    return tuple(g if n else None for g, n in zip((dx, dwd, dbd, dwu, dbu), need, strict=True))


# ------------------------------------------------------------------- cross-entropy rows


def cross_entropy_rows_(z: torch.Tensor, targets: torch.Tensor,
                        scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, z[target])`` per row of the fp32 logits chunk ``z [R, V]``; with ``scale [R]``, ``z``
    is overwritten with ``scale · (softmax - onehot)`` (``kernels/cross_entropy.py``)."""
    if z.dtype != torch.float32 or z.stride(1) != 1:
        raise TritonUnsupported("cross_entropy_rows_: the logits chunk must be fp32 with unit column stride")
    lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    zy = torch.empty_like(lse)
    _cek.ce_rows_(z, targets.contiguous(), None if scale is None else scale.float().contiguous(), lse, zy)
    return lse, zy
