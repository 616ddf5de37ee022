"""Triton implementations of the ptpeft_fast ops: thin autograd wrappers over ``ptpeft_fast.kernels``.

The public ops in :mod:`ptpeft_fast.ops` call these when ``resolve_backend`` returns
``"triton"``; they take the same arguments as the public ops minus ``backend``. They run on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run them).

Limits (each raises :class:`TritonUnsupported`, a ``ValueError``, naming the alternative):

- ``prefix_attention``: ``attn_mask`` must be exactly "key padding (one contiguous run of visible real keys per
  sequence: left or right padding) with or without bottom-right causality", as a bool mask
  or an additive float mask whose entries are all 0 or -inf/dtype-min. Such masks become
  per-sequence ``[klo, khi)`` ranges for the kernel; any other mask (sliding windows,
  ALiBi-style biases, per-head patterns) is refused so that a caller may use the torch path.
  Checking costs one elementwise pass over the mask and one host sync; the result is cached
  for the mask tensor object (unchanged version), so the layers of one forward pay once.
- head dim <= 256.

Dropout (attention probabilities, LoRA input) runs in-kernel from a Philox seed drawn from
torch's generator; masks are regenerated in the backward, never stored.
- ``adapter``: bottleneck <= 256.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional, Union

import torch

from ptpeft_fast.kernels import adapter as _adk
from ptpeft_fast.kernels import lora as _lk
from ptpeft_fast.kernels import prefix_attention as _pak

__all__ = [
    "TritonUnsupported",
    "adapter",
    "attention_dropout_mask",
    "lora_dropout_mask",
    "lora_linear",
    "mask_to_key_range",
    "poison_outputs",
    "prefix_attention",
]

MAX_HEAD_DIM = 256
MAX_BOTTLENECK = 256


from ._backend import BackendUnsupported


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

_mask_cache: dict = {"ref": None}


def mask_to_key_range(
    attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Convert a padding (+ bottom-right causal) mask into per-sequence key ranges.

    ``attn_mask`` (bool, True = attend; or additive float with entries 0 / -inf / dtype-min)
    must broadcast to ``[batch, heads, q_len, k_len]``. Returns ``(klo, khi, causal)``: int32
    tensors of shape ``[batch]`` such that real key j is visible to query i iff
    ``klo[b] <= j < khi[b]`` and, if ``causal``, ``j <= i + k_len - q_len``.

    Raises :class:`TritonUnsupported` for any mask not of that form.
    """
    return _key_range(attn_mask, batch, heads, q_len, k_len)[:3]


def _key_range(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int):
    """``(klo, khi, causal, unpadded)``, cached for the last mask tensor (object + version).

    Transformers builds one mask per forward and hands it to every layer, so the checks and
    their host syncs run once per forward, not once per layer.
    """
    key = (id(attn_mask), attn_mask._version, tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype,
           batch, heads, q_len, k_len)
    ref = _mask_cache["ref"]
    if ref is not None and ref() is attn_mask and _mask_cache["key"] == key:
        return _mask_cache["value"]
    klo, khi, causal = _mask_to_key_range(attn_mask, batch, heads, q_len, k_len)
    value = (klo, khi, causal, bool(((klo == 0) & (khi == k_len)).all()))
    try:
        _mask_cache.update(ref=weakref.ref(attn_mask), key=key, value=value)
    except TypeError:  # pragma: no cover - tensors are weak-referenceable
        pass
    return value


def _mask_to_key_range(m: torch.Tensor, B: int, H: int, L: int, S: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if m.dim() > 4:
        raise TritonUnsupported(f"attn_mask has {m.dim()} dims; expected at most 4 ([B,H,L,S])")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    hm = H if m.shape[1] == H else 1
    try:
        m = m.expand(B, hm, L, S)
    except RuntimeError as e:
        raise TritonUnsupported(f"attn_mask of shape {tuple(m.shape)} does not broadcast to {(B, H, L, S)}") from e
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        allowed = m == 0
        blocked = (m == float("-inf")) | (m <= torch.finfo(m.dtype).min / 2)
        if not bool((allowed | blocked).all()):
            raise TritonUnsupported(
                "backend='triton' takes additive float masks only when every entry is 0 or -inf "
                "(a boolean mask in disguise); general biases need backend='torch'"
            )
    else:
        raise TritonUnsupported(f"attn_mask dtype {m.dtype} is neither bool nor floating")
    keys = allowed.any(dim=2).any(dim=1)  # [B, S]: keys some query sees
    idx = torch.arange(S, device=m.device)
    has = keys.any(dim=1)
    first = torch.where(keys, idx, S).amin(dim=1)
    last = torch.where(keys, idx, -1).amax(dim=1)
    klo = torch.where(has, first, 0)
    khi = torch.where(has, last + 1, 0)
    in_range = (idx[None, :] >= klo[:, None]) & (idx[None, :] < khi[:, None])  # [B, S]
    pad_form = in_range[:, None, None, :]
    causal_ok = idx[None, :] <= torch.arange(L, device=m.device)[:, None] + (S - L)  # [L, S]
    causal_form = pad_form & causal_ok
    if torch.equal(allowed, pad_form.expand_as(allowed)):
        causal = False
    elif torch.equal(allowed, causal_form.expand_as(allowed)):
        causal = True
    else:
        raise TritonUnsupported(
            "backend='triton' supports attn_mask only of the form 'key padding (one contiguous "
            "run of real keys per sequence) with or without bottom-right causality'; this mask "
            "is something else (sliding window, per-head pattern, ...): use backend='torch'"
        )
    return klo.to(torch.int32).contiguous(), khi.to(torch.int32).contiguous(), causal


# ------------------------------------------------------------------- prefix attention


def _rng_seed(device: torch.device) -> int:
    # Drawn from torch's (CPU) generator so torch.manual_seed makes Triton dropout reproducible;
    # < 2**30 leaves room for the per-(batch, head) key offsets added in the kernels.
    return int(torch.randint(0, 2**30, (1,)).item())


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, klo, khi, causal: bool, scale: float, dropout_p: float, seed: int):
        B, H, L, D = q.shape
        out = _new((B, H, L, D), q.dtype, q.device)
        lse2 = _new((B, H, L), torch.float32, q.device)
        _pak.attn_forward(q, k, v, pk, pv, out, lse2, klo, khi, causal=causal, scale=scale,
                          dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse2, klo, khi)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, out, lse2, klo, khi = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = (_new_like(t) for t in (q, k, v, pk, pv))
        _pak.attn_backward(q, k, v, pk, pv, out, dout, lse2, klo, khi, dq, dk, dv, dpk, dpv,
                           causal=ctx.causal, scale=ctx.scale, dropout_p=ctx.dropout_p, seed=ctx.seed)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None


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
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Attention of q over [prefix ; real keys] with the Triton flash kernel.

    Shapes: q ``[B,H,L,D]``; k, v ``[B,Hkv,S,D]``; prefix ``[Hkv,P,D]`` (shared by the batch)
    or ``[B,Hkv,P,D]``. Returns ``[B,H,L,D]`` in q's dtype. The prefix is always visible; real
    keys follow ``attn_mask`` if given, else bottom-right causality if ``causal``, else all.
    ``dropout_p > 0`` drops attention probabilities with an in-kernel RNG keyed by ``seed``
    (default: drawn from torch's generator); the keep mask is
    :func:`attention_dropout_mask` ``(B, H, L, P + S, dropout_p, seed)``.
    Raises :class:`TritonUnsupported` for unsupported masks or head dim > 256.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B,H,L,D] / [B,Hkv,S,D]")
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"query heads {H} are not a multiple of key/value heads {Hkv}")
    if prefix_k.shape != prefix_v.shape or prefix_k.dim() not in (3, 4):
        raise ValueError("prefix_k and prefix_v must both be [Hkv,P,D] or [B,Hkv,P,D]")
    if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D or (prefix_k.dim() == 4 and prefix_k.shape[0] != B):
        raise ValueError(f"prefix {tuple(prefix_k.shape)} does not match k {tuple(k.shape)}")
    if D > MAX_HEAD_DIM:
        raise TritonUnsupported(f"head dim {D} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    dt = q.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {dt} is not supported (fp16, bf16, fp32)")
    # One compute dtype for every operand; the casts stay on the autograd graph.
    k, v, prefix_k, prefix_v = (t.to(dt) for t in (k, v, prefix_k, prefix_v))
    if scale is None:
        scale = _pak.default_scale(D)
    klo = khi = None
    if attn_mask is not None:
        if attn_mask.requires_grad:
            raise TritonUnsupported("backend='triton' does not differentiate through attn_mask; use backend='torch'")
        klo, khi, causal, unpadded = _key_range(attn_mask, B, H, L, S)
        if unpadded:
            klo = khi = None  # nothing padded: skip the range loads
    if seed is None:
        seed = _rng_seed(q.device) if dropout_p > 0 else 0
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, klo, khi, bool(causal), float(scale),
                                  float(dropout_p), int(seed))


def attention_dropout_mask(
    B: int, H: int, L: int, n_keys: int, dropout_p: float, seed: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """The keep mask (bool ``[B,H,L,P+S]``, prefix columns first) ``prefix_attention`` uses for ``seed``."""
    return _pak.dropout_keep_mask(B, H, L, n_keys, dropout_p, seed, torch.device(device))


# ------------------------------------------------------------------------------ LoRA




class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        M, K = x2.shape
        N, r = weight.shape[0], lora_a.shape[0]
        y = _new((M, N), x.dtype, x.device)
        t = _new((M, r), torch.float32, x.device)
        _lk.lora_forward(x2, weight, bias, lora_a, lora_b, y, t, scaling=scaling, dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, t)
        ctx.has_bias = bias is not None
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.shape = scaling, dropout_p, seed, shape
        return y.reshape(*shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, t = ctx.saved_tensors
        N = weight.shape[0]
        dy2 = dy.reshape(-1, N)
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dx = dw = db = da = dlb = None
        u = _new((dy2.shape[0], lora_a.shape[0]), torch.float32, dy.device)
        dx2 = _new(x2.shape, x2.dtype, x2.device) if need_x else None
        if need_x or need_a:  # u = s·dY B feeds dA; the same kernel writes dX
            _lk.lora_backward_dx(dy2, weight, lora_a, lora_b, dx2, u, scaling=ctx.scaling,
                                 dropout_p=ctx.dropout_p, seed=ctx.seed)
        if need_x:
            dx = dx2.reshape(ctx.shape)
        if need_a or need_lb:
            da = _new(lora_a.shape, lora_a.dtype, lora_a.device)
            dlb = _new(lora_b.shape, lora_b.dtype, lora_b.device)
            _lk.lora_backward_ab(x2, dy2, t, u, da, dlb, scaling=ctx.scaling, dropout_p=ctx.dropout_p, seed=ctx.seed)
        if need_w:
            # dW = dYᵀX is a plain GEMM with nothing to fuse: cuBLAS is the right tool.
            dw = (dy2.t() @ x2).to(weight.dtype)
        if ctx.has_bias and need_b:
            db = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, (da if need_a else None), (dlb if need_lb else None), None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with the fused Triton kernel.

    x ``[..., in]``, weight ``[out, in]``, lora_a ``[r, in]``, lora_b ``[out, r]``. Dropout
    (``dropout_p > 0``) uses an in-kernel RNG seeded by ``seed`` (default: drawn from torch's
    generator, so ``torch.manual_seed`` makes it reproducible); the keep mask for x viewed as
    ``[M, in]`` is :func:`lora_dropout_mask` ``((M, in), dropout_p, seed)``, regenerated in
    the backward, never stored.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    dt = x.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {dt} is not supported (fp16, bf16, fp32)")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != K or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not match weight {tuple(weight.shape)}")
    if lora_a.shape[0] > 256:
        raise TritonUnsupported(f"LoRA rank {lora_a.shape[0]} > 256 is not supported by the fused kernel")
    weight, lora_a, lora_b = (t.to(dt) for t in (weight, lora_a, lora_b))
    bias = bias.to(dt) if bias is not None else None
    if seed is None:
        seed = _rng_seed(x.device) if dropout_p > 0 else 0
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed)


def lora_dropout_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The keep-mask (bool ``[M, in]``) that ``lora_linear`` uses for ``seed`` (for tests)."""
    return _lk.dropout_mask(shape, dropout_p, seed, torch.device(device))


# ---------------------------------------------------------------------------- Adapter

_ACTS = {"relu": 0, "gelu": 1, "silu": 2}


class _Adapter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wd, bd, wu, bu, act: int, residual: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        M, d = x2.shape
        h = wd.shape[0]
        y = _new((M, d), x.dtype, x.device)
        z = _new((M, h), torch.float32, x.device)
        _adk.adapter_forward(x2, wd, bd, wu, bu, y, z, act=act, residual=residual)
        ctx.save_for_backward(x2, wd, wu, z)
        ctx.act, ctx.residual, ctx.shape = act, residual, shape
        ctx.has_bd, ctx.has_bu = bd is not None, bu is not None
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, wd, wu, z = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape)
        need = ctx.needs_input_grad
        dx = _new(x2.shape, x2.dtype, x2.device)
        dz = _new(z.shape, torch.float32, z.device)
        _adk.adapter_backward_dx(dy2, wd, wu, z, dx, dz, act=ctx.act, residual=ctx.residual)
        dwd = dbd = dwu = dbu = None
        if any(need[1:5]):
            dwd = _new(wd.shape, wd.dtype, wd.device)
            dwu = _new(wu.shape, wu.dtype, wu.device)
            dbd32 = _new((wd.shape[0],), torch.float32, wd.device)
            dbu32 = _new((wu.shape[0],), torch.float32, wu.device)
            _adk.adapter_backward_w(x2, dy2, z, dz, dwd, dwu, dbd32, dbu32, act=ctx.act)
            dbd = dbd32.to(wd.dtype) if ctx.has_bd else None
            dbu = dbu32.to(wu.dtype) if ctx.has_bu else None
        return (dx.reshape(ctx.shape) if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
                dwu if need[3] else None, dbu if need[4] else None, None, None)


def adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
    activation: str = "relu",
    residual: bool = True,
) -> torch.Tensor:
    """``x + up(act(down(x)))`` (``residual=False`` drops the ``x +``) in one fused kernel.

    x ``[..., d]``, down_weight ``[h, d]``, up_weight ``[d, h]``; act in relu|gelu (exact,
    erf)|silu; h <= 256 stays on chip.
    """
    if activation not in _ACTS:
        raise ValueError(f"activation={activation!r} is not one of {tuple(_ACTS)}")
    dt = x.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise TritonUnsupported(f"dtype {dt} is not supported (fp16, bf16, fp32)")
    d = x.shape[-1]
    h = down_weight.shape[0]
    if down_weight.shape != (h, d) or up_weight.shape != (d, h):
        raise ValueError(f"down {tuple(down_weight.shape)} / up {tuple(up_weight.shape)} do not match x {tuple(x.shape)}")
    if h > MAX_BOTTLENECK:
        raise TritonUnsupported(f"bottleneck {h} > {MAX_BOTTLENECK} does not fit on chip; use backend='torch'")
    down_weight, up_weight = down_weight.to(dt), up_weight.to(dt)
    down_bias = down_bias.to(dt) if down_bias is not None else None
    up_bias = up_bias.to(dt) if up_bias is not None else None
    return _Adapter.apply(x, down_weight, down_bias, up_weight, up_bias, _ACTS[activation], bool(residual))
