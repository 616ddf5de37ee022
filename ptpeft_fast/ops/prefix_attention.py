r"""Attention over ``P`` prefix keys/values plus the layer's own keys (DESIGN §2).

Layout: ``q [B, H, L, D]``, ``k, v [B, Hkv, S, D]`` (``H % Hkv == 0``: MHA, GQA, MQA),
``prefix_k, prefix_v [Hkv, P, D]`` (shared by the batch) or ``[B, Hkv, P, D]``. The output
is ``[B, H, L, D]`` — heads before tokens, like SDPA; transformers' attention functions
return ``[B, L, H, D]``, so the caller transposes.

Semantics: every query attends to every prefix key (never masked, not by causality, not by
padding). Among the real keys the layer's own mask applies: ``attn_mask`` (bool, True =
attend, or additive float; broadcastable to ``[B, H, L, S]``) if given, else the
bottom-right-aligned causal mask when ``causal`` (query ``i`` sees real key ``j`` iff
``j <= i + S - L``), else nothing. With both ``causal`` and a mask, the mask is assumed to
encode causality already (that is how transformers passes it) and is applied as is.

Torch path (CPU and anything else without Triton)
-------------------------------------------------
Block path. fp32 CPU calls with a batch-shared prefix (padding masks included: the additive
mask is added to a block's real-key scores), up to ``P + S = FLASH_PREFIX_MAX_KEYS`` keys, run
``csrc/prefix_flash_cpu.cpp``: per block of 64 query rows, the scores over ``[Kp; K]`` (the
prefix keys first, then the real keys the block sees) by BLAS ``sgemm``, one softmax, the
output by ``sgemm``; ``lse`` is saved and the backward recomputes the block's probabilities
(flash style). 0.6-0.7x the fwd+bwd time of the general path below at ``L <= 1024``; beyond
≈ 4K keys ATen's key-blocked flash kernel keeps its scores in cache better, so the general
path runs there.

General path (fp64/half precision, per-sample prefixes, long sequences, no BLAS).
Write ``s = scale``, ``S1 = s q Kᵀ + M`` (real keys, mask ``M``), ``S2 = s q Kpᵀ`` (prefix).
The joint softmax over ``[S2, S1]`` splits exactly into two pieces merged by log-sum-exp::

    lse1 = logsumexp(S1)   O1 = softmax(S1) V          # fused flash kernel
    lse2 = logsumexp(S2)   (L x P per head, small)
    lse  = logaddexp(lse1, lse2)
    out  = exp(lse1 - lse) O1 + P2 Vp,      P2 = exp(S2 - lse)

Forward runs the real-key part through ATen's CPU flash attention
(``_scaled_dot_product_flash_attention_for_cpu``, which returns ``O1`` and ``lse1`` and
handles GQA by itself, no ``repeat_interleave``) and the prefix part with two small batched
matmuls; the merge is one in-place row scaling of ``O1`` plus ``P2 Vp`` accumulated by the
GEMM itself. The kernel's ``is_causal`` is top-left aligned, so it is used only when
``S == L`` (no mask, or a bool mask with nothing allowed above the diagonal — transformers'
causal+padding mask — where it merely skips blocks); causal with ``S != L`` gets a small
``[L, S]`` additive mask. The kernel wants a float mask of the query dtype: bool masks are
converted at their own (broadcast) shape, ``[B, 1, L, S]`` typically. The prefix is
never expanded over the batch: query heads are grouped by key/value head as
``[B, Hkv, G·L, D]`` (a view for contiguous ``q``), a batch-shared prefix is multiplied
with one ``bmm`` per batch element (``matmul`` broadcasting would copy it ``B`` times),
and ``dKp``/``dVp`` are summed over the batch by GEMM accumulation (``baddbmm_``), over
the query-head groups by the ``G·L`` contraction. No mask over ``P + S`` keys is ever built.

Backward. With ``P1 = exp(S1 - lse)`` and ``P2 = exp(S2 - lse)`` the joint probabilities,
``dO`` the output gradient and ``Δ = rowsum(dO ∘ out)``::

    dP1 = dO Vᵀ            dS1 = P1 ∘ (dP1 - Δ)
    dP2 = dO Vpᵀ           dS2 = P2 ∘ (dP2 - Δ)
    dq  = s (dS1 K + dS2 Kp)
    dK  = s dS1ᵀ q         dV  = P1ᵀ dO
    dKp = s dS2ᵀ q         dVp = P2ᵀ dO        (summed over batch/groups when shared)

The flash backward kernel computes exactly the ``S1`` terms when it is handed the FINAL
merged ``out`` and ``lse`` (it rebuilds ``P1 = exp(S1 - lse)`` and ``Δ`` from them), so it
is called with those and the ``S2`` terms are added by hand; ``P2`` is saved from forward
(``B·H·L·P`` floats, small next to ``q``).

A fully masked query row (all real keys masked) still sees the prefix: masks are made
finite (``finfo.min`` instead of ``-inf``) so the kernel returns ``lse1 ≈ finfo.min`` and
the merge gives the real part weight 0 — no NaN when ``P >= 1``.

Fallback math path (autograd through plain ops) when ``dropout_p > 0``, when a float
``attn_mask`` requires grad (T5's trained position bias) or off CPU (the fused kernel above
is CPU-only; CUDA's fast path is Triton): the scores are computed in two
pieces, softmaxed jointly, dropped out and multiplied, still without expanding the prefix.
Dropout keep-masks are drawn prefix part first (``[B,H,L,P]``) then real part
(``[B,H,L,S]``), each as ``torch.rand(..., dtype=torch.float32) >= p`` from torch's default
generator (``torch.manual_seed`` reproduces them).

Half precision (fp16/bf16) inputs: the flash kernel accumulates in fp32 and returns an fp32
``lse``; the prefix part and the merge run in fp32 and the result is cast back.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ._backend import cpu_ext_op, forced_backend, resolve_backend, try_kernel
from ._autocast import in_autocast_dtype
from ._checks import check_dtype_device

__all__ = ["prefix_attention"]

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grp(x: torch.Tensor, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, X]`` → ``[B, Hkv, G·L, X]`` (query heads grouped by their key/value head).

    A view for a contiguous ``x`` of ``dtype``; a copy otherwise.
    """
    B, H, L, X = x.shape
    out = x.reshape(B, Hkv, (H // Hkv) * L, X)
    return out if out.dtype == dtype else out.to(dtype)


def _pref(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return p if p.dtype == dtype else p.to(dtype)


def _mm_prefix(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``a [B, Hkv, M, X] @ p`` with ``p [Hkv, X, Y]`` (batch-shared) or ``[B, Hkv, X, Y]``.

    The shared prefix is never broadcast by ``matmul`` (which would copy it ``B`` times):
    one ``bmm`` per batch element writes straight into the result.
    """
    if p.dim() == 4:
        return torch.matmul(a, p)
    res = torch.empty(a.shape[:-1] + (p.shape[-1],), dtype=a.dtype, device=a.device)
    for b in range(a.shape[0]):
        torch.bmm(a[b], p, out=res[b])
    return res


def _mm_prefix_acc(target: torch.Tensor, a: torch.Tensor, p: torch.Tensor, alpha: float) -> None:
    """``target += alpha · a @ p`` in place (GEMM accumulation, no temporary); see ``_mm_prefix``."""
    if p.dim() == 4:
        B, Hkv = a.shape[:2]
        flat = target.view(B * Hkv, *target.shape[2:])
        flat.baddbmm_(a.reshape(B * Hkv, *a.shape[2:]), p.reshape(B * Hkv, *p.shape[2:]), alpha=alpha)
        return
    for b in range(a.shape[0]):
        target[b].baddbmm_(a[b], p, alpha=alpha)


def _mm_reduce(a_t: torch.Tensor, c: torch.Tensor, shared: bool) -> torch.Tensor:
    """``a_t [B, Hkv, Y, M] @ c [B, Hkv, M, Z]``, summed over the batch when ``shared``."""
    if not shared:
        return torch.matmul(a_t, c)
    res = torch.bmm(a_t[0], c[0])
    for b in range(1, a_t.shape[0]):
        res.baddbmm_(a_t[b], c[b])
    return res


class _PrefixAttentionFn(torch.autograd.Function):
    """Flash attention over real keys + explicit prefix part, merged by log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, mask, flash_causal: bool, scale: float):  # type: ignore[override]
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        acc = _acc_dtype(q.dtype)

        out1, lse1 = _flash_fwd(q, k, v, 0.0, flash_causal, attn_mask=mask, scale=scale)

        block = _prefix_block_ops(q, prefix_k, prefix_v, out1)
        ctx.block_ops = block  # backward uses the same pair: no second lookup and check
        if block is not None:  # the prefix block in one C++ pass per row, merged into out1 in place
            lse_full, p2 = block[0](q, out1, lse1.to(q.dtype), prefix_k, prefix_v, scale)
            ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out1, lse_full, p2, mask)
            ctx.flash_causal, ctx.scale = flash_causal, scale
            return out1

        pk_t = _pref(prefix_k, acc).transpose(-1, -2).contiguous()  # tiny; faster GEMM operand
        pv = _pref(prefix_v, acc)
        s2 = _mm_prefix(_grp(q, Hkv, acc), pk_t).mul_(scale)  # [B, Hkv, G·L, P]
        lse1g = lse1.reshape(B, Hkv, -1, 1).to(acc)  # [B, Hkv, G·L, 1]
        # joint log-sum-exp with in-place passes over s2 (cheaper than logsumexp + logaddexp)
        m = torch.maximum(s2.amax(dim=-1, keepdim=True), lse1g)
        e2 = s2.sub_(m).exp_()
        w1 = torch.sub(lse1g, m).exp_()  # unnormalised weight of the real-key part
        denom = e2.sum(dim=-1, keepdim=True).add_(w1)
        p2 = e2.div_(denom)  # joint-softmax probabilities of the prefix
        w1.div_(denom)  # weight of the real-key part: exp(lse1 - lse)
        lse = denom.log_().add_(m)

        if out1.dtype == acc and out1.is_contiguous():
            # merge in place: out = w1 · O1 + P2 Vp, the second term as GEMM accumulation
            out_g = out1.view(B, Hkv, -1, D).mul_(w1)
            _mm_prefix_acc(out_g, p2, pv, 1.0)
            out = out1
        else:
            # the kernel's output follows q's layout ([B, L, H, D] memory from transformers):
            # merge through 5-D views so that layout is kept (the caller's transpose is free)
            G = H // Hkv
            o2 = _mm_prefix(p2, pv).view(B, Hkv, G, L, D)
            w1_5 = w1.view(B, Hkv, G, L, 1)
            out1_5 = out1.view(B, Hkv, G, L, D)
            if out1.dtype == acc:
                out1_5.mul_(w1_5).add_(o2)
                out = out1
            else:  # half precision: merge in fp32, round once
                out1_5.copy_(torch.addcmul(o2, out1_5, w1_5))
                out = out1
        lse_full = lse.view(B, H, L)  # merged lse: what the flash backward needs

        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse_full, p2, mask)
        ctx.flash_causal = flash_causal
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, prefix_k, prefix_v, out, lse, p2, mask = ctx.saved_tensors
        scale = ctx.scale
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        shared = prefix_k.dim() == 3
        acc = _acc_dtype(q.dtype)
        grad_out = grad_out.to(q.dtype)
        if grad_out.stride(-1) != 1:  # the ATen kernel assumes a unit-stride head dim
            grad_out = grad_out.contiguous()

        # real-key terms: the flash kernel rebuilds P1 from the merged lse and Δ from out;
        # skipped when nothing upstream wants them (stage 1, first layer: only the prefix trains)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = None
        if need_q or need_k or need_v:
            dq, dk, dv = _flash_bwd(grad_out, q, k, v, out, lse, 0.0, ctx.flash_causal, attn_mask=mask, scale=scale)

        if ctx.block_ops is not None:
            dpk, dpv = ctx.block_ops[1](
                grad_out, q, out, p2, prefix_k, prefix_v, dq if need_q else None, scale)
            dpk = dpk if ctx.needs_input_grad[3] else None
            dpv = dpv if ctx.needs_input_grad[4] else None
            return dq if need_q else None, dk if need_k else None, dv if need_v else None, dpk, dpv, None, None, None

        # prefix terms by hand
        pk = _pref(prefix_k, acc)
        pv_t = _pref(prefix_v, acc).transpose(-1, -2).contiguous()
        dog = _grp(grad_out, Hkv, acc)  # [B, Hkv, G·L, D]
        delta = torch.linalg.vecdot(dog, _grp(out, Hkv, acc)).unsqueeze(-1)  # rowsum(dO ∘ out)
        ds2 = _mm_prefix(dog, pv_t).sub_(delta).mul_(p2)  # [B, Hkv, G·L, P]

        dpk = dpv = None
        if ctx.needs_input_grad[4]:
            dpv = _mm_reduce(p2.transpose(-1, -2), dog, shared).to(prefix_v.dtype)
        if ctx.needs_input_grad[3]:
            dpk = _mm_reduce(ds2.transpose(-1, -2), _grp(q, Hkv, acc), shared).mul_(scale).to(prefix_k.dtype)
        if need_q:
            if dq.dtype == acc and dq.is_contiguous():
                _mm_prefix_acc(dq.view(B, Hkv, -1, D), ds2, pk, scale)
            else:  # the kernel returns dq in [B, L, H, D] memory order: one strided add
                G = H // Hkv
                dq.view(B, Hkv, G, L, D).add_(_mm_prefix(ds2, pk).view(B, Hkv, G, L, D), alpha=scale)
        else:
            dq = None
        return dq, dk if need_k else None, dv if need_v else None, dpk, dpv, None, None, None


def _math_path(q, k, v, prefix_k, prefix_v, mask, causal_mask, scale: float, dropout_p: float) -> torch.Tensor:
    """Plain-ops prefix attention (autograd by torch); used for dropout and trainable masks.

    ``mask`` is None, bool (True = attend) or additive float; ``causal_mask`` is None or a
    bool ``[L, S]``. Scores are computed as two pieces and softmaxed jointly.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    P = prefix_k.shape[-2]
    acc = _acc_dtype(q.dtype)

    def prefix_mm(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # autograd-friendly: per-batch matmuls against the shared prefix (no broadcast copy)
        if p.dim() == 4 or a.shape[0] == 0:  # B = 0: nothing to stack (and nothing to copy)
            return torch.matmul(a, p)
        return torch.stack([a[b] @ p for b in range(a.shape[0])])

    qg = _grp(q, Hkv, acc)  # [B, Hkv, G·L, D]
    s1 = torch.matmul(qg, k.to(acc).transpose(-1, -2)).mul(scale).view(B, H, L, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            s1 = s1.masked_fill(~mask, float("-inf"))
        else:
            s1 = s1 + mask.to(acc)
    if causal_mask is not None:
        s1 = s1.masked_fill(~causal_mask, float("-inf"))
    s1 = s1.view(B, Hkv, G * L, S)
    s2 = prefix_mm(qg, _pref(prefix_k, acc).transpose(-1, -2)).mul(scale)  # [B, Hkv, G·L, P]

    if S == 0:  # no real keys: only the prefix
        m = s2.amax(dim=-1, keepdim=True).detach()
    else:
        m = torch.maximum(s1.amax(dim=-1, keepdim=True), s2.amax(dim=-1, keepdim=True)).detach()
    e1 = torch.exp(s1 - m)
    e2 = torch.exp(s2 - m)
    denom = e1.sum(dim=-1, keepdim=True) + e2.sum(dim=-1, keepdim=True)
    p1 = e1 / denom
    p2 = e2 / denom
    if dropout_p > 0.0:
        keep_p = torch.rand(B, H, L, P, dtype=torch.float32, device=q.device) >= dropout_p
        keep_r = torch.rand(B, H, L, S, dtype=torch.float32, device=q.device) >= dropout_p
        p2 = p2 * keep_p.view(B, Hkv, G * L, P) / (1.0 - dropout_p)
        p1 = p1 * keep_r.view(B, Hkv, G * L, S) / (1.0 - dropout_p)
    out = torch.matmul(p1, v.to(acc)) + prefix_mm(p2, _pref(prefix_v, acc))
    return out.view(B, H, L, D).to(q.dtype)


def _validate(q, k, v, prefix_k, prefix_v, attn_mask, scale, dropout_p) -> None:
    names = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"prefix_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("q", "k", "v"):
        if names[name].dim() != 4:
            raise ValueError(
                f"prefix_attention: {name} must be 4-D [B, heads, tokens, head_dim]; got shape {tuple(names[name].shape)} "
                "(transformers' [B, tokens, heads, head_dim] tensors need .transpose(1, 2))"
            )
    if not q.is_floating_point():
        raise ValueError(f"prefix_attention: q must be floating point, got {q.dtype}")
    check_dtype_device("prefix_attention", "q", q, names.items())
    B, H, L, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"prefix_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B:
        raise ValueError(f"prefix_attention: k has batch {k.shape[0]} but q has batch {B}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"prefix_attention: q has {H} heads, not a multiple of the {Hkv} key/value heads of k/v "
            "(GQA/MQA need num_heads % num_key_value_heads == 0)"
        )
    if k.shape[3] != D:
        raise ValueError(f"prefix_attention: head_dim of k/v is {k.shape[3]} but q's is {D}; they must match")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_attention: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must have the same shape"
        )
    if prefix_k.dim() == 3:
        lead, want = prefix_k.shape[:1], (Hkv,)
    elif prefix_k.dim() == 4:
        lead, want = prefix_k.shape[:2], (B, Hkv)
    else:
        lead, want = None, None
    if lead is None or tuple(lead) != want or prefix_k.shape[-1] != D:
        raise ValueError(
            f"prefix_attention: prefix_k/prefix_v must be [Hkv, P, D] = [{Hkv}, P, {D}] (shared by the batch) or "
            f"[B, Hkv, P, D] = [{B}, {Hkv}, P, {D}]; got {tuple(prefix_k.shape)} (prefixes are sized by the key/value heads)"
        )
    if prefix_k.shape[-2] < 1:
        raise ValueError(
            "prefix_attention: the prefix has P = 0 tokens; use torch's scaled_dot_product_attention without a prefix"
        )
    if D < 1:
        raise ValueError(f"prefix_attention: head_dim is {D}; it must be at least 1")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"prefix_attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"prefix_attention: attn_mask must be bool (True = attend) or an additive float mask, got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"prefix_attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
        full = (B, H, L, k.shape[2])
        ok = 2 <= attn_mask.dim() <= 4 and all(
            m in (1, f) for m, f in zip(attn_mask.shape[::-1], full[::-1])
        )
        if not ok:
            raise ValueError(
                f"prefix_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, L, S] = "
                f"{list(full)}; it covers the real keys only (no prefix columns), e.g. [B, 1, L, S]"
            )
    if scale is not None:
        if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"prefix_attention: scale must be a finite non-zero float or None, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"prefix_attention: dropout_p must be in [0, 1), got {dropout_p!r}")


def _finite_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float mask of ``dtype`` with ``-inf`` replaced by ``finfo.min`` (keeps lse finite)."""
    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, lowest)
    mask = mask.to(dtype)
    if torch.isneginf(mask).any():
        mask = mask.clamp(min=lowest)
    return mask


@in_autocast_dtype
def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``P`` never-masked prefix keys plus the real keys.

    Args:
        q: ``[B, H, L, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` real keys/values, ``H % Hkv == 0`` (GQA/MQA).
        prefix_k, prefix_v: ``[Hkv, P, D]`` (shared by the batch, never expanded) or
            ``[B, Hkv, P, D]``, ``P >= 1``; in projected space (no RoPE).
        causal: bottom-right-aligned causal mask over the real keys when no ``attn_mask``.
        attn_mask: bool (True = attend) or additive float, broadcastable to
            ``[B, H, L, S]``; applies to real keys only. A trainable float mask (e.g. T5's
            position bias) receives its gradient.
        scale: softmax scale, default ``1 / sqrt(D)``.
        dropout_p: attention-probability dropout (prefix and real keys alike).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"xformers"`` (see ``ops._backend``).

    Returns:
        ``[B, H, L, D]`` in ``q``'s dtype (transpose to ``[B, L, H, D]`` for transformers);
        inside ``torch.autocast`` in the autocast dtype (the operands, a float mask included, are
        cast to it, as for SDPA there).

    Raises:
        ValueError: on malformed shapes, dtypes, devices, masks, scale or dropout.
    """
    _validate(q, k, v, prefix_k, prefix_v, attn_mask, scale, dropout_p)
    chosen = resolve_backend(
        "prefix_attention", backend, q, k, v, prefix_k, prefix_v, attn_mask, supported=("torch", "triton", "xformers")
    )
    if chosen == "triton":
        from . import triton_ops

        out = try_kernel(backend, lambda: triton_ops.prefix_attention(
            q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p
        ))
        if out is not None:
            return out
    if chosen == "xformers":
        from . import xformers_ops

        return xformers_ops.prefix_attention(
            q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p
        )

    L, S, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # causal without a mask: top-left == bottom-right when S == L; a single query sees all.
    flash_causal = bool(causal and attn_mask is None and S == L and L > 1)
    causal_mask = None
    if causal and attn_mask is None and S != L and L > 1:
        causal_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)

    # the fused kernel is ATen's CPU one; other devices get here only when the torch path is
    # forced (Triton is their fast path), and take the device-agnostic math path
    # ATen's CPU kernel kills the process (SIGFPE) when L == 0 or S == 0 and cannot take B == 0:
    # empty sizes take the math path. It also reads q/k/v as if the head dim had unit stride
    # (public SDPA guarantees that; we call the kernel directly), and takes 2-D or 4-D masks only.
    # The BLAS calls of the block path also need rows that do not overlap (_dense_rows).
    empty = q.shape[0] == 0 or L == 0 or S == 0
    if not empty:
        q, k, v = (_dense_rows(t) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(0)
    if empty or dropout_p > 0.0 or (attn_mask is not None and attn_mask.requires_grad) or q.device.type != "cpu":
        if flash_causal:
            causal_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        return _math_path(q, k, v, prefix_k, prefix_v, attn_mask, causal_mask, scale, float(dropout_p))

    mask = causal_mask if attn_mask is None else attn_mask
    if attn_mask is not None and attn_mask.dtype == torch.bool and S == L and L > 1:
        # A bool mask with nothing allowed above the diagonal (transformers' causal+padding
        # mask) gives the same result with the kernel's causal flag on, which skips the
        # upper-triangle blocks. Rows it leaves fully masked get weight 0 in the merge anyway.
        upper = torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1)
        flash_causal = not bool((attn_mask & upper).any())
    mask = None if mask is None else _finite_additive(mask, q.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    if not needs_grad and prefix_k.dim() == 3 and q.dtype in (torch.float32, torch.float64):
        decode = _decode_op() if L <= DECODE_MAX_QUERIES and not flash_causal else None
        if decode is not None:
            if mask is not None and mask.dim() == 2:
                mask = mask.view(1, 1, L, S)
            return decode(q, k, v, prefix_k.contiguous(), prefix_v.contiguous(), mask, scale)
    flash = _flash_prefix_ops(q, k, prefix_k)
    if flash is not None:  # one softmax over prefix + real keys by blocks of query rows (C++)
        if mask is not None:  # broadcast (size-1 or expanded) dims are read in place; keys need unit stride
            mask = mask[None, None] if mask.dim() == 2 else mask
            mask = mask if mask.stride(-1) == 1 else mask.contiguous()
        if needs_grad:
            return _FlashPrefixFn.apply(q, k, v, prefix_k, prefix_v, mask, flash_causal, scale, flash)
        return flash[0](q, k, v, prefix_k, prefix_v, mask, flash_causal, scale)[0]
    if not needs_grad and prefix_k.dim() == 3 and q.dtype in (torch.float32, torch.float64):
        return _inference_forward(q, k, v, prefix_k, prefix_v, mask, flash_causal, scale)
    return _PrefixAttentionFn.apply(q, k, v, prefix_k, prefix_v, mask, flash_causal, scale)


FLASH_PREFIX_MAX_KEYS = 4096  # P + S up to which the block path runs; beyond, ATen's key-blocked kernel is faster


def _flash_prefix_ops(q: torch.Tensor, k: torch.Tensor, prefix_k: torch.Tensor):
    """``(forward, backward)`` of ``csrc/prefix_flash_cpu.cpp`` where it applies, else None.

    It applies to fp32 CPU tensors with a batch-shared prefix and at most
    ``FLASH_PREFIX_MAX_KEYS`` keys (a padding or other additive mask over the real keys is added
    to the block's scores), and needs the BLAS ``sgemm`` that torch exports (MKL's in the x86
    Linux wheels; without one the general path runs). It replaces ATen's flash kernel plus the
    prefix block: 0.62x their fwd+bwd time at B=4 H=8 L=512 D=64 P=32 (benchmarks/analysis.md).
    """
    if (
        q.device.type != "cpu"
        or q.dtype != torch.float32
        or prefix_k.dim() != 3
        or prefix_k.dtype != torch.float32
        or prefix_k.shape[1] + k.shape[2] > FLASH_PREFIX_MAX_KEYS
    ):
        return None
    fwd = cpu_ext_op("flash_prefix_forward")
    bwd = cpu_ext_op("flash_prefix_backward")
    if fwd is None or bwd is None or not _flash_prefix_blas():
        return None
    return fwd, bwd


@functools.lru_cache(maxsize=None)
def _flash_prefix_blas() -> bool:
    """Whether torch exports the ``sgemm`` the block path calls (checked once)."""
    return bool(torch.ops.ptpeft_fast.flash_prefix_available())


def _dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its head dim has unit stride and its rows do not overlap (what BLAS needs), else a copy."""
    if t.stride(-1) == 1 and (t.shape[2] <= 1 or t.stride(2) >= t.shape[3]):
        return t
    return t.contiguous()


class _FlashPrefixFn(torch.autograd.Function):
    """Prefix attention by blocks of query rows (``csrc/prefix_flash_cpu.cpp``): the scores
    over ``[Kp; K]`` of 64 rows at a time, one softmax, ``lse`` saved for the backward, which
    recomputes the block's probabilities (flash style: nothing ``[L, S]``-sized is stored)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, mask, causal: bool, scale: float, ops):  # type: ignore[override]
        fwd, bwd = ops  # the pair prefix_attention chose (_flash_prefix_ops)
        out, lse = fwd(q, k, v, prefix_k, prefix_v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, mask, out, lse)
        ctx.bwd, ctx.causal, ctx.scale = bwd, causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, prefix_k, prefix_v, mask, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = ctx.bwd(_dense_rows(grad_out.to(q.dtype)), q, k, v, prefix_k, prefix_v, mask, out, lse, ctx.causal,
                        ctx.scale, any(need[:3]))
        return tuple(g if n else None for g, n in zip(grads, need[:5])) + (None, None, None, None)


def _prefix_block_ops(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, out1: torch.Tensor):
    """``(forward, backward)`` of ``csrc/prefix_block_cpu.cpp`` for the prefix block of the
    autograd path, or None where it does not apply (then the ATen-op path runs): fp32 CPU
    tensors, head dim 64 or 128, a batch-shared prefix of at most 64 tokens, an AVX-512 build."""
    if (
        q.device.type != "cpu"
        or q.dtype != torch.float32
        or q.shape[-1] not in (64, 128)
        or prefix_k.dim() != 3
        or prefix_k.shape[1] > 64
        or prefix_k.dtype != q.dtype
        or prefix_v.dtype != q.dtype
        or out1.dtype != q.dtype
        or out1.stride(-1) != 1
    ):
        return None
    fwd = cpu_ext_op("prefix_block_forward")
    bwd = cpu_ext_op("prefix_block_backward")
    return None if fwd is None or bwd is None else (fwd, bwd)


DECODE_MAX_QUERIES = 8  # queries per row up to which a no-grad call takes the one-pass C++ op


def _decode_op():
    """``torch.ops.ptpeft_fast.prefix_decode_attention`` (csrc/decode_attention_cpu.cpp), or None
    when the extension cannot be built (then the generic no-grad path runs).

    Decode steps (``L = 1``) do a few hundred thousand flops per layer; the generic path's ~10
    tensor ops cost more in dispatch than that, the one-pass op does not.
    """
    return cpu_ext_op("prefix_decode_attention")


def prefix_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    backend: str = "auto",
) -> Optional[torch.Tensor]:
    """One decode step (a single query per row, no autograd, CPU) through the C++ op, or None
    when that does not apply (the caller then runs :func:`prefix_attention`).

    The entry for the attention function the model patch registers: its tensors come from
    transformers' attention layer, so the Python argument checks of :func:`prefix_attention`
    (≈ 60 µs per layer and step, as much as the op itself at decode sizes) are left to the
    op's own shape and dtype checks. Same result as :func:`prefix_attention` with
    ``causal=False`` (one query sees every key); ``attn_mask`` bool or additive, 4-D.
    """
    if (
        q.dim() != 4
        or q.shape[2] != 1
        or q.device.type != "cpu"
        or q.dtype not in (torch.float32, torch.float64)
        or prefix_k.dim() != 3
        or backend != "auto"
        or forced_backend() is not None
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v)):
        return None
    if attn_mask is not None and (attn_mask.dim() != 4 or attn_mask.requires_grad):
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.shape[2] == 0 or q.shape[0] == 0:
        return None
    op = _decode_op()
    if op is None:
        return None
    mask = None if attn_mask is None else _finite_additive(attn_mask, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return op(q, k, v, prefix_k.contiguous(), prefix_v.contiguous(), mask, scale)


def _inference_forward(q, k, v, prefix_k, prefix_v, mask, flash_causal: bool, scale: float) -> torch.Tensor:
    """Forward without autograd for a batch-shared prefix (evaluation, ``generate``).

    The same log-sum-exp merge as :class:`_PrefixAttentionFn`, in fewer and larger ops, which
    is what counts at decode sizes (L = 1, a few µs of dispatch per op): the batch is folded
    into the rows of one GEMM per key/value head (``[Hkv, B·G·L, D] @ [Hkv, D, P]``), one
    softmax over ``[S2 | lse1]`` gives the prefix probabilities and the real part's weight
    together, and one ``baddbmm`` merges ``w1·O1 + P2·Vp``.
    """
    B, H, L, D = q.shape
    Hkv, P = prefix_k.shape[0], prefix_k.shape[1]
    M = B * (H // Hkv) * L
    out1, lse1 = _flash_fwd(q, k, v, 0.0, flash_causal, attn_mask=mask, scale=scale)
    fold = lambda t, width: t.reshape(B, Hkv, -1, width).transpose(0, 1).reshape(Hkv, M, width)  # noqa: E731
    s2 = torch.bmm(fold(q, D), prefix_k.transpose(1, 2)).mul_(scale)  # [Hkv, M, P]
    p = torch.softmax(torch.cat([s2, fold(lse1.to(s2.dtype), 1)], -1), -1)  # [P2 | w1]
    o = torch.baddbmm(fold(out1, D).mul_(p[..., P:]), p[..., :P], prefix_v)
    return o.view(Hkv, B, -1, D).transpose(0, 1).reshape(B, H, L, D)
