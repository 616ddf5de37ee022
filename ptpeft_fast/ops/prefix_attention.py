r"""Attention over ``P`` prefix keys/values plus the layer's own keys (design §2), as
``torch.library`` ops with one dispatch table.

Layout: ``q [B, H, L, D]``, ``k, v [B, Hkv, S, D]`` (``H % Hkv == 0``: MHA, GQA, MQA),
``prefix_k, prefix_v [Hkv, P, D]`` (shared by the batch) or ``[B, Hkv, P, D]``. The output is
``[B, H, L, D]`` — heads before tokens, like SDPA — with ``q``'s memory layout (transformers'
``[B, L, H, D]`` storage stays so, and its transpose back is free).

Semantics: every query attends to every prefix key (never masked, not by causality, not by
padding). Among the real keys the layer's own mask applies: ``attn_mask`` (bool, True = attend,
or additive float; broadcastable to ``[B, H, L, S]``) if given, else the bottom-right-aligned
causal mask when ``causal`` (query ``i`` sees real key ``j`` iff ``j <= i + S - L``), else
nothing. With both ``causal`` and a mask, the mask is taken to encode causality already (that is
how transformers passes it).

Implementations (:data:`TABLE`, first that applies under ``backend="auto"``):

========== ======================================================================= ==========
name       what                                                                    auto on
========== ======================================================================= ==========
decode_cpp no autograd, ≤ 8 queries per row, fp32/fp64, shared prefix (C++)        CPU
triton     Triton flash kernel over [prefix ; keys], fp16/bf16/fp32, head dim      CUDA
           ≤ 256, dropout in-kernel; declines a mask that is not padding/causal
           ranges (:mod:`.mask_ranges`), so ``chunked`` runs it (a traced call,
           whose mask cannot be read yet, checks inside the op and does the same)
block_cpp  fp32, shared prefix (auto: P + S ≤ 1600): blocks of 64 query rows by   CPU
           sgemm (C++)
lse_merge  ATen's CPU flash kernel over the real keys + the prefix merged by        CPU
           log-sum-exp (every dtype, any length; auto: half precision only
           beyond 512×544 scores per head)
chunked    chunks of queries in tensor ops, backward written out (any device,       CUDA
           dtype, mask; dropout): never builds [B, H, L, P + S] scores
xformers   xformers' memory-efficient attention over the concatenated prefix        by name
torch      the reference (plain autograd ops): dropout on CPU, a trainable float     always
           mask (T5's position bias), empty sizes, short half-precision calls
========== ======================================================================= ==========

The ops: ``ptpeft_fast::prefix_attention_forward`` → ``(out, lse)`` and
``ptpeft_fast::prefix_attention_backward`` (registered as its autograd formula), and
``ptpeft_fast::prefix_decode`` (no autograd). Each has a fake kernel, so ``torch.compile`` traces
a patched model as one graph; the choice is made once per call from tensor metadata and the plain
facts of :mod:`.availability`, outside the ops, and passed to them as ``impl``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import attention_chunked as chunked
from . import availability as avail
from . import dispatch, documents
from ._autocast import in_autocast_dtype
from ._checks import check_dtype_device
from .attention_cpu import (
    DECODE_MAX_QUERIES,
    FLASH_PREFIX_MAX_KEYS,
    block_backward,
    block_forward,
    decode_forward,
    lse_merge_backward,
    lse_merge_forward,
)
from .attention_reference import reference_attention
from .mask_ranges import ranges_reason
from .precision import accumulation_dtype

__all__ = ["prefix_attention", "prefix_decode_step", "TABLE", "AttentionCall", "DECODE_MAX_QUERIES",
           "FLASH_PREFIX_MAX_KEYS"]

_first = dispatch.first_reason


class AttentionCall(NamedTuple):
    """What the table needs to know about one call (plain values)."""

    device: str
    dtype: torch.dtype
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    shared: bool
    mask: str  # "none", "bool", "float"
    mask_grad: bool
    dropout: bool
    needs_grad: bool
    # why the mask is not key padding (+ causality), which the Triton kernel needs; None: it is, or
    # there is no mask, or it was not asked (Triton cannot run here anyway, or the call is being
    # traced: the op then checks at run time and computes such a mask by its chunked path)
    not_ranges: Optional[str] = None
    # packed documents (``cu_seqlens``): the longest document's length, else 0
    max_seqlen: int = 0
    varlen: bool = False


def _call(q, k, v, prefix_k, prefix_v, *, causal: bool = False, attn_mask=None, scale=None, dropout_p: float = 0.0,
          cu_seqlens=None, max_seqlen: Optional[int] = None, **_) -> AttentionCall:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v))
    mask = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    not_ranges = None
    if (attn_mask is not None and not attn_mask.requires_grad and not torch.compiler.is_compiling()
            and avail.triton_declines(q.device.type, q.dtype) is None):
        not_ranges = ranges_reason(attn_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return AttentionCall(q.device.type, q.dtype, q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                         prefix_k.shape[-2], q.shape[3], prefix_k.dim() == 3, mask,
                         attn_mask is not None and attn_mask.requires_grad, dropout_p > 0, needs_grad, not_ranges,
                         _max_seqlen(cu_seqlens, max_seqlen, q.shape[2]), cu_seqlens is not None)


def _max_seqlen(cu_seqlens, max_seqlen: Optional[int], T: int) -> int:
    if cu_seqlens is None:
        return 0
    if max_seqlen is not None:
        return int(max_seqlen)
    # read only where it is free (CPU, eager); otherwise assume the worst, one document of T
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        return documents.longest(cu_seqlens)
    return T


def _empty(c: AttentionCall) -> bool:
    return c.B == 0 or c.L == 0 or c.S == 0


def _decode_applies(c: AttentionCall) -> Optional[str]:
    return _first((c.device != "cpu", "CPU only"),
                  (c.needs_grad, "autograd is needed (it has no backward)"),
                  (c.L > DECODE_MAX_QUERIES, f"{c.L} queries per row > {DECODE_MAX_QUERIES}"),
                  (c.varlen, "packed documents (cu_seqlens)"),
                  (c.dtype not in (torch.float32, torch.float64), f"{c.dtype} (fp32/fp64 only)"),
                  (not c.shared, "a per-sample prefix"), (c.dropout, "attention dropout"),
                  (c.mask_grad, "the mask requires grad"), (_empty(c), "an empty size"),
                  (not avail.ext_op("prefix_decode_attention"), "the C++ extension is unavailable"))


def _triton_applies(c: AttentionCall) -> Optional[str]:
    return avail.triton_declines(c.device, c.dtype) or _first(
                  (c.D > 256, f"head dim {c.D} > 256"), (c.mask_grad, "the mask requires grad"),
                  (c.B == 0 or c.L == 0, "an empty size"),
                  (c.not_ranges is not None, f"a mask the kernel cannot take ({c.not_ranges})"),
                  (c.varlen and c.dropout, "packed documents with attention dropout (that kernel branch spilled "
                                           "registers; chunked runs them)"))


def _block_applies(c: AttentionCall) -> Optional[str]:
    return _first((c.device != "cpu", "CPU only"), (c.dtype != torch.float32, f"{c.dtype} (fp32 only)"),
                  (not c.shared, "a per-sample prefix"),
                  (c.dropout, "attention dropout"), (c.mask_grad, "the mask requires grad"),
                  (_empty(c), "an empty size"),
                  (not avail.ext_op("flash_prefix_forward"), "the C++ extension is unavailable"),
                  (not avail.flash_prefix_blas(), "torch exports no sgemm"))


def _block_auto(c: AttentionCall) -> Optional[str]:
    """Where it was measured faster than lse_merge (see ``FLASH_PREFIX_MAX_KEYS``); packed
    documents run one at a time, so their longest counts."""
    keys = c.P + (c.max_seqlen if c.varlen else c.S)
    if keys > FLASH_PREFIX_MAX_KEYS:
        return f"{keys} keys > {FLASH_PREFIX_MAX_KEYS} (lse_merge measured as fast or faster)"
    return None


# lse_merge in half precision: ATen's CPU flash kernel converts per block; up to about this many
# scores per head the reference's few large matmuls are faster (measured fwd+bwd, bf16, B=4 H=8
# D=64 P=32: 1.8x the reference's time at L=128, 1.07x at L=512; beyond, the reference's
# [B, H, L, P+S] scores cost more memory than the time they save).
HALF_REFERENCE_MAX_SCORES = 512 * 544


def _lse_merge_auto(c: AttentionCall) -> Optional[str]:
    if c.varlen:  # the reference would build the dense T x T document mask
        return None
    if c.dtype in (torch.float16, torch.bfloat16) and c.L * (c.P + c.S) <= HALF_REFERENCE_MAX_SCORES:
        return f"{c.dtype} with {c.L}x{c.P + c.S} scores per head: the reference was measured faster"
    return None


def _lse_merge_applies(c: AttentionCall) -> Optional[str]:
    return _first((c.device != "cpu", "CPU only (ATen's CPU flash kernel)"), (c.dropout, "attention dropout"),
                  (c.mask_grad, "the mask requires grad"), (_empty(c), "an empty size"))


def _chunked_applies(c: AttentionCall) -> Optional[str]:
    return _first((c.mask_grad, "the mask requires grad"), (_empty(c), "an empty size"))


def _chunked_auto(c: AttentionCall) -> Optional[str]:
    if c.device == "cuda" or c.varlen:  # on CPU: packed documents with dropout (the others decline it)
        return None
    return f"{c.device}: the CPU entries above are measured faster"


def _xformers_applies(c: AttentionCall) -> Optional[str]:
    return _first((c.device != "cuda", "CUDA only"), (not avail.xformers_ok(), "xformers is not installed"),
                  (c.varlen, "packed documents (cu_seqlens) are not wired to xformers' block-diagonal masks"))


def _torch_auto(c: AttentionCall) -> Optional[str]:
    if c.varlen and not c.mask_grad and not _empty(c):
        return "packed documents: the reference builds the dense T x T mask (asked for by name it runs)"
    return None


TABLE = dispatch.Table("prefix_attention", [
    dispatch.Impl("decode_cpp", _decode_applies, summary="csrc/decode_attention_cpu.cpp, no autograd"),
    dispatch.Impl("triton", _triton_applies, auto=("cuda",), summary="kernels/prefix_attention.py"),
    dispatch.Impl("block_cpp", _block_applies, auto=_block_auto, summary="csrc/prefix_flash_cpu.cpp"),
    dispatch.Impl("lse_merge", _lse_merge_applies, auto=_lse_merge_auto, summary="ATen CPU flash + log-sum-exp merge"),
    dispatch.Impl("chunked", _chunked_applies, auto=_chunked_auto, summary="query chunks in tensor ops"),
    dispatch.Impl("xformers", _xformers_applies, auto=False, summary="xformers memory_efficient_attention"),
    dispatch.Impl("torch", lambda c: None, auto=_torch_auto, summary="reference: plain autograd ops"),
])
dispatch.register(TABLE, _call)


# ----------------------------------------------------------------------------- the ops


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``torch.empty_like(ref)`` (what the fake kernels promise)."""
    want = torch.empty_like(ref, device="meta").stride()
    if t.stride() == want or t.numel() == 0:
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


def _seed(seed: Optional[torch.Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _triton():
    from . import triton_ops

    return triton_ops


@torch.library.custom_op("ptpeft_fast::prefix_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                attn_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                causal: bool, scale: float, dropout_p: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, L, D] like q, lse [B, H, L])`` by implementation ``impl`` (the table's choice);
    with ``cu_seqlens`` (packed documents, B = 1) the Triton kernels and block_cpp's C++ loop take
    the offsets, and every other implementation runs once per document (:mod:`.documents`)."""
    if cu_seqlens is not None and impl == "block_cpp":  # the C++ loop takes the documents itself
        out, lse = block_forward(q, k, v, prefix_k, prefix_v, None, True, scale, cu_seqlens)
        return _like(out, q), lse.contiguous()
    if cu_seqlens is not None and impl != "triton":
        def one(q, k, v, pk, pv, mask, causal, scale, d):
            return _dense_forward(q, k, v, pk, pv, mask, causal, scale, dropout_p, _doc_seed(seed, d), impl)

        out, lse = documents.forward_by_document(one, q, k, v, prefix_k, prefix_v, cu_seqlens, scale)
        return _like(out, q), lse.contiguous()
    if impl == "triton":
        tr = _triton()
        try:
            out, lse = tr.prefix_attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, dropout_p,
                                                   _seed(seed), cu_seqlens)
        except tr.TritonUnsupported:  # traced: the table could not read the mask (eager calls never get here)
            out, lse = chunked.chunked_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, dropout_p,
                                               _seed(seed))
        return _like(out, q), lse.contiguous()
    out, lse = _dense_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, dropout_p, _seed(seed), impl)
    return _like(out, q), lse.contiguous()


def _doc_seed(seed: Optional[torch.Tensor], d: int) -> int:
    """The dropout seed of document ``d`` (its own stream: documents share no query rows)."""
    return (_seed(seed) * 1_000_033 + d) % (1 << 62)


def _dense_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal: bool, scale: float, dropout_p: float, seed: int,
                   impl: str):
    args = (q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    if impl == "block_cpp":
        out, lse = block_forward(*args)
    elif impl == "lse_merge":
        out, lse = lse_merge_forward(*args)
    elif impl == "chunked":
        out, lse = chunked.chunked_forward(*args, dropout_p, seed)
    else:
        raise ValueError(f"prefix_attention_forward: no implementation {impl!r}")
    return out, lse


@_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, causal, scale, dropout_p, impl):
    acc = accumulation_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.custom_op("ptpeft_fast::prefix_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                 prefix_v: torch.Tensor, attn_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                 dropout_p: float, impl: str, need: list[bool]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)``; an input whose ``need`` is False gets an empty tensor."""
    args = (grad_out, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale)
    if cu_seqlens is not None and impl == "block_cpp":
        grads = block_backward(grad_out, q, k, v, prefix_k, prefix_v, None, out, lse, True, scale, any(need[:3]),
                               cu_seqlens)
    elif cu_seqlens is not None and impl != "triton":
        def one(grad_out, q, k, v, pk, pv, mask, out, lse, causal, scale, d):
            return _dense_backward((grad_out, q, k, v, pk, pv, mask, out, lse, causal, scale), dropout_p,
                                   _doc_seed(seed, d), impl, need)

        grads = documents.backward_by_document(one, grad_out, q, k, v, prefix_k, prefix_v, out, lse, cu_seqlens,
                                               scale, need)
    elif impl == "triton":
        tr = _triton()
        try:
            grads = tr.prefix_attention_backward(*args, dropout_p, _seed(seed), cu_seqlens)
        except tr.TritonUnsupported:  # the forward ran chunked for this mask (the check is the same)
            grads = chunked.chunked_backward(*args, dropout_p, _seed(seed))
    else:
        grads = _dense_backward(args, dropout_p, _seed(seed), impl, need)
    refs = (q, k, v, prefix_k, prefix_v)
    return tuple(_like(g, r) if n and g is not None else r.new_empty(0)
                 for g, r, n in zip(grads, refs, need, strict=True))


def _dense_backward(args: tuple, dropout_p: float, seed: int, impl: str, need: list[bool]):
    if impl == "block_cpp":
        return block_backward(*args, any(need[:3]))
    if impl == "lse_merge":
        return lse_merge_backward(*args, need)
    if impl == "chunked":
        return chunked.chunked_backward(*args, dropout_p, seed)
    raise ValueError(f"prefix_attention_backward: no implementation {impl!r}")


@_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, out, lse, causal, scale, dropout_p, impl,
      need):
    return tuple(torch.empty_like(r) if n else r.new_empty(0)
                 for r, n in zip((q, k, v, prefix_k, prefix_v), need, strict=True))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, causal, scale, dropout_p, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, out, lse)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.impl = causal, scale, dropout_p, impl


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, out, lse = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    grads = _backward_op(grad_out, q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, out, lse, ctx.causal,
                         ctx.scale, ctx.dropout_p, ctx.impl, need)
    return tuple(g if n else None for g, n in zip(grads, need, strict=True)) + (None,) * 7


torch.library.register_autograd("ptpeft_fast::prefix_attention_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("ptpeft_fast::prefix_decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
               attn_mask: Optional[torch.Tensor], causal: bool, scale: float) -> torch.Tensor:
    """Forward only (decode steps): ``[B, H, L, D]`` like q."""
    return _like(decode_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale), q)


@_decode_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------- public op


def _validate(q, k, v, prefix_k, prefix_v, attn_mask, scale, dropout_p) -> None:
    names = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"prefix_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("q", "k", "v"):
        if names[name].dim() != 4:
            raise ValueError(
                f"prefix_attention: {name} must be 4-D [B, heads, tokens, head_dim]; got shape "
                f"{tuple(names[name].shape)} (transformers' [B, tokens, heads, head_dim] tensors need .transpose(1, 2))"
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
            f"prefix_attention: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} "
            "must have the same shape"
        )
    if prefix_k.dim() == 3:
        lead, want = tuple(prefix_k.shape[:1]), (Hkv,)
    elif prefix_k.dim() == 4:
        lead, want = tuple(prefix_k.shape[:2]), (B, Hkv)
    else:
        lead, want = None, None
    if lead is None or lead != want or prefix_k.shape[-1] != D:
        raise ValueError(
            f"prefix_attention: prefix_k/prefix_v must be [Hkv, P, D] = [{Hkv}, P, {D}] (shared by the batch) or "
            f"[B, Hkv, P, D] = [{B}, {Hkv}, P, {D}]; got {tuple(prefix_k.shape)} "
            "(prefixes are sized by the key/value heads)"
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
                "prefix_attention: attn_mask must be bool (True = attend) or an additive float mask, got "
                f"{attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"prefix_attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
        full = (B, H, L, k.shape[2])
        # trailing dims broadcast against [B, H, L, S]; a 2- or 3-D mask has fewer dims than full
        ok = 2 <= attn_mask.dim() <= 4 and all(m in (1, f)
                                                for m, f in zip(attn_mask.shape[::-1], full[::-1], strict=False))
        if not ok:
            raise ValueError(
                f"prefix_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, L, S] = "
                f"{list(full)}; it covers the real keys only (no prefix columns), e.g. [B, 1, L, S]"
            )
    if scale is not None:
        if (isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
                or scale == 0):
            raise ValueError(f"prefix_attention: scale must be a finite non-zero float or None, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"prefix_attention: dropout_p must be in [0, 1), got {dropout_p!r}")


def _validate_documents(q, k, attn_mask, causal: bool, cu_seqlens, max_seqlen) -> None:
    """Packed documents: one row, self-attention, causal, no other mask; offsets that fit."""
    B, _, T, _ = q.shape
    problem = _first((B != 1, f"q has batch {B}: pack the documents into one row ([1, H, T, D])"),
                     (k.shape[2] != T, f"k has {k.shape[2]} tokens but q has {T}: no cache with packed documents"),
                     (attn_mask is not None, "attn_mask is given too: the offsets are the mask, pass one or the other"),
                     (not causal, "causal=False: documents attend causally within themselves, pass causal=True"))
    if problem is not None:
        raise ValueError(f"prefix_attention: packed documents (cu_seqlens): {problem}")
    documents.check_offsets(cu_seqlens, T, q.device, check_values=not torch.compiler.is_compiling())
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0):
        raise ValueError(
            f"prefix_attention: max_seqlen must be a Python int (the longest document), got {max_seqlen!r}")


def _run(impl: str, q, k, v, prefix_k, prefix_v, attn_mask, causal: bool, scale: float, dropout_p: float,
         cu_seqlens: Optional[torch.Tensor] = None):
    """The chosen implementation, without argument checks (those ran already)."""
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if impl == "torch":
        if cu_seqlens is not None:  # the spec: the dense document mask
            attn_mask = documents.document_mask(cu_seqlens, q.shape[2])
        return reference_attention(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, dropout_p)
    if impl == "decode_cpp":
        return _decode_op(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    if impl == "xformers":
        from . import xformers_ops

        return xformers_ops.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask,
                                             scale=scale, dropout_p=dropout_p)
    seed = torch.randint(0, 2**30, (1,), dtype=torch.int64) if dropout_p > 0 else None
    out, _ = _forward_op(q, k, v, prefix_k, prefix_v, attn_mask, cu_seqlens, seed, causal, scale, float(dropout_p),
                         impl)
    return out


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
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
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
        backend: ``"auto"`` or an implementation of :data:`TABLE` (``"torch"``: the reference);
            :func:`ptpeft_fast.ops.explain` says which runs and why.
        cu_seqlens: packed documents ("varlen", as FlashAttention's and transformers'
            ``cu_seq_lens_q``): int32 ``[n_docs + 1]`` offsets from 0 to ``T`` with q ``[1, H, T, D]``
            and k, v ``[1, Hkv, T, D]``; query ``i`` of document ``d`` sees every prefix key and the
            keys ``cu_seqlens[d] <= j <= i`` (``causal=True``, no ``attn_mask``). Work is
            ``Σ Lᵢ·(Lᵢ + P)``, never ``T²`` (:mod:`ptpeft_fast.ops.documents`).
        max_seqlen: the longest document (a Python int), as transformers' ``max_length_q``; read
            from ``cu_seqlens`` when not given (on CPU; on CUDA taken as ``T``). Used to choose the
            implementation only.

    Returns:
        ``[B, H, L, D]`` in ``q``'s dtype (transpose to ``[B, L, H, D]`` for transformers);
        inside ``torch.autocast`` in the autocast dtype (the operands, a float mask included, are
        cast to it, as for SDPA there).

    Raises:
        ValueError: on malformed shapes, dtypes, devices, masks, scale or dropout, and
            (:class:`~ptpeft_fast.ops.dispatch.BackendUnsupported`) when a named backend cannot run the call.
    """
    _validate(q, k, v, prefix_k, prefix_v, attn_mask, scale, dropout_p)
    if cu_seqlens is not None:
        _validate_documents(q, k, attn_mask, causal, cu_seqlens, max_seqlen)
        cu_seqlens = cu_seqlens.to(torch.int32)
    impl = TABLE.choose(backend, _call(q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask,
                                       dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _run(impl, q, k, v, prefix_k, prefix_v, attn_mask, bool(causal), scale, float(dropout_p), cu_seqlens)


def prefix_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    backend: str = "auto",
    causal: bool = False,
) -> Optional[torch.Tensor]:
    """A decode step (up to :data:`DECODE_MAX_QUERIES` queries per row: one token, or a draft's
    few in assisted generation) through ``decode_cpp``, or None where the table would not choose it
    (the caller then runs :func:`prefix_attention`).

    The entry of the patched attention function for ``generate``: its tensors come from
    transformers' attention layer, so :func:`prefix_attention`'s Python argument checks (≈ 60 µs per
    layer and step, as much as the op itself at decode sizes) are left to the op's own checks. Same
    result as :func:`prefix_attention` with the same ``causal``; ``attn_mask`` bool or additive, 4-D.
    """
    if q.dim() != 4 or k.dim() != 4 or prefix_k.dim() != 3:
        return None
    if attn_mask is not None and attn_mask.dim() != 4:
        return None
    call = _call(q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask)
    if TABLE.requested(backend) not in ("auto", "decode_cpp") or _decode_applies(call) is not None:
        return None
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _decode_op(q, k, v, prefix_k, prefix_v, attn_mask, bool(causal) and q.shape[2] > 1, scale)
