r"""Packed documents ("varlen"): one row of ``T`` tokens holding several documents, each attending
only to itself (causally) and to the prefix.

The documents are given as offsets, as FlashAttention and transformers' ``cu_seq_lens_q`` give
them: ``cu_seqlens`` int32 ``[n_docs + 1]``, ``0 = c_0 <= c_1 <= … <= c_n = T``; document ``d``
holds tokens ``c_d … c_{d+1} - 1``. Query ``i`` of document ``d`` sees every prefix key and the
real keys ``j`` with ``c_d <= j <= i``. An empty document (``c_d == c_{d+1}``) is allowed and holds
nothing.

What this module gives the implementations:

- :func:`document_mask` — the dense bool ``[1, 1, T, T]`` mask of that rule: the reference
  (the spec) runs it, nothing fast does;
- :func:`token_bounds` — ``(doc_lo, doc_hi)`` int32 ``[T]``: the first token of the query's
  document and one past its last (tensor ops, no host sync: what the Triton kernels read);
- :func:`spans` — the documents as host ``(start, end)`` pairs, and :func:`forward_by_document`
  / :func:`backward_by_document`, which run a dense causal implementation once per document, so
  the work is ``Σ Lᵢ·(Lᵢ + P)``, never ``T²``.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from .precision import accumulation_dtype

__all__ = ["check_offsets", "document_mask", "token_bounds", "spans", "longest", "forward_by_document",
           "backward_by_document"]


def check_offsets(cu_seqlens: object, T: int, device: torch.device, check_values: bool = True) -> None:
    """Raise ``ValueError`` naming the problem when ``cu_seqlens`` is not offsets of ``T`` tokens.

    ``check_values=False`` checks type, dtype, shape and device only (no host sync: traced calls).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"prefix_attention: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"prefix_attention: cu_seqlens must be a 1-D int32 tensor [n_docs + 1] of document offsets from 0 to T "
            f"(as transformers' cu_seq_lens_q); got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"prefix_attention: cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if not check_values:
        return
    # every layer of a forward gets the same offsets tensor: its values are read (a host sync on
    # CUDA) once, not once per layer
    key = (cu_seqlens._version, T)
    ref = _checked["ref"]
    if ref is not None and ref() is cu_seqlens and _checked["key"] == key:
        return
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:], strict=False)):
        shown = c if len(c) <= 12 else c[:6] + ["…"] + c[-5:]
        raise ValueError(
            f"prefix_attention: cu_seqlens {shown} must rise from 0 to the {T} tokens of the packed row, never "
            "falling (document d holds tokens cu_seqlens[d] .. cu_seqlens[d+1] - 1)")
    _checked.update(ref=weakref.ref(cu_seqlens), key=key)


_checked: dict = {"ref": None, "key": None}  # the offsets tensor whose values passed last


def document_mask(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """bool ``[1, 1, T, T]``: query ``i`` may see real key ``j`` (same document, ``j <= i``)."""
    lo, _ = token_bounds(cu_seqlens, T)
    i = torch.arange(T, device=cu_seqlens.device)
    return ((i[None, :] >= lo[:, None]) & (i[None, :] <= i[:, None]))[None, None]


def token_bounds(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc_lo, doc_hi)`` int32 ``[T]``: the bounds ``[c_d, c_{d+1})`` of each token's document."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(T, device=cu.device)
    doc = torch.searchsorted(cu[1:], tokens, right=True)  # the d with c_d <= i < c_{d+1}
    return cu[doc].to(torch.int32).contiguous(), cu[doc + 1].to(torch.int32).contiguous()


def spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """The non-empty documents as host ``(start, end)`` pairs (one host sync on CUDA)."""
    c = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(c, c[1:], strict=False) if b > a]


def longest(cu_seqlens: torch.Tensor) -> int:
    """The longest document's length (``max_seqlen``), read on the host."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


# a dense implementation: (q, k, v, prefix_k, prefix_v, mask, causal, scale, doc_index) -> (out, lse)
DenseForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def forward_by_document(fwd: DenseForward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        prefix_k: torch.Tensor, prefix_v: torch.Tensor, cu_seqlens: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [1, H, T, D], lse [1, H, T])``: ``fwd`` once per document on its causal slice."""
    out = torch.zeros_like(q)
    lse = q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    for d, (s, e) in enumerate(spans(cu_seqlens)):
        o, lse_d = fwd(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], prefix_k, prefix_v, None, True, scale, d)
        out[:, :, s:e] = o
        lse[:, :, s:e] = lse_d
    return out, lse


def backward_by_document(bwd: Callable[..., tuple[Optional[torch.Tensor], ...]], grad_out: torch.Tensor,
                         q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                         prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float, need: list[bool]) -> tuple[Optional[torch.Tensor], ...]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` (None where ``need`` is False): ``bwd(grad_out, q, k, v,
    prefix_k, prefix_v, mask, out, lse, causal, scale, doc_index)`` once per document; the prefix
    gradients are summed over the documents (tokens outside every document get zero)."""
    acc = accumulation_dtype(q.dtype)
    dq, dk, dv = (torch.zeros_like(t) if n else None for t, n in zip((q, k, v), need[:3], strict=True))
    dpk = torch.zeros(prefix_k.shape, dtype=acc, device=q.device) if need[3] else None
    dpv = torch.zeros(prefix_v.shape, dtype=acc, device=q.device) if need[4] else None
    for d, (s, e) in enumerate(spans(cu_seqlens)):
        g = bwd(grad_out[:, :, s:e], q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], prefix_k, prefix_v, None,
                out[:, :, s:e], lse[:, :, s:e], True, scale, d)
        for full, part in ((dq, g[0]), (dk, g[1]), (dv, g[2])):
            if full is not None:
                full[:, :, s:e] = part
        if dpk is not None:
            dpk += g[3]
        if dpv is not None:
            dpv += g[4]
    return (dq, dk, dv, None if dpk is None else dpk.to(prefix_k.dtype),
            None if dpv is None else dpv.to(prefix_v.dtype))
