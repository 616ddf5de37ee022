"""Batched singular values and spectrum statistics: one dispatch table and the torch reference.

Implementations (:data:`TABLE`): ``"csrc"`` — the C++/CUDA extension in ``csrc/`` (Gram matrix
of the smaller side + symmetric eigensolver, parallel over the batch, statistics fused in the same
call); ``"torch"`` — the specification, ``torch.linalg.svdvals`` plus the formulas of design §1.
``"auto"`` picks ``csrc`` when the extension has a kernel for the tensors' device.

``ptpeft_fast::batched_singular_values`` and ``ptpeft_fast::batched_spectrum_stats`` are
``torch.library`` ops with fake kernels (the statistics' length K depends on ``lengths``: an
unbacked size). Inputs are validated here, before any kernel runs; every problem is a
``ValueError`` that names it. The ops are not differentiable (analysis only): they run under
``no_grad``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _ext
from . import availability as avail
from . import dispatch

__all__ = [
    "SPECTRUM_BACKENDS",
    "TABLE",
    "RawSpectrumStats",
    "resolve_spectrum_backend",
    "singular_values",
    "spectrum_stats",
    "stats_from_singular_values",
    "curve_statistics",
]

SPECTRUM_BACKENDS = ("auto", "csrc", "torch")


class RawSpectrumStats(NamedTuple):
    """Batch statistics (float64): mean normalised spectrum [K], its accumulated curve [K],
    remaining-rank ratio and mean effective rank (0-d tensors)."""

    mean_spectrum: torch.Tensor
    curve: torch.Tensor
    remaining_rank_ratio: torch.Tensor
    effective_rank: torch.Tensor


class SpectrumCall(NamedTuple):
    device: str


def _csrc_applies(c: SpectrumCall) -> str | None:
    if c.device == "cpu":
        return None if avail.ext_op("singular_values") else (
            f"the C++ extension is unavailable ({_ext.ext_error() or 'not built'})")
    if c.device == "cuda":
        return None if _cuda_kernel() else "the extension was built without a CUDA kernel"
    return f"{c.device} tensors"


@torch.compiler.assume_constant_result
def _cuda_kernel() -> bool:
    return _ext.load_ext() and _ext.has_kernel("singular_values", "CUDA")


TABLE = dispatch.Table("singular_values", [
    dispatch.Impl("csrc", _csrc_applies, summary="Gram + ?syevd per sample (csrc/spectrum_*.cpp/.cu)"),
    dispatch.Impl("torch", lambda c: None, summary="reference: torch.linalg.svdvals"),
])
dispatch.register(TABLE, lambda features, *a, **k: SpectrumCall(features.device.type))


def resolve_spectrum_backend(requested: str, features: torch.Tensor) -> str:
    """Return ``"csrc"`` or ``"torch"`` for ``features``; ``ValueError`` if ``requested`` cannot run."""
    if requested not in SPECTRUM_BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of {SPECTRUM_BACKENDS}")
    return TABLE.choose(requested, SpectrumCall(features.device.type))


@torch.library.custom_op("ptpeft_fast::batched_singular_values", mutates_args=())
def _svals_op(features: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if features.is_cuda and features.dtype == torch.float32:
        # The CUDA kernel has no float64 refinement of rank-deficient samples (the CPU one has):
        # its float32 Gram misses the fp32 tolerance there, so it solves in float64.
        return torch.ops.ptpeft_fast.singular_values(features.double(), lengths).float()
    return torch.ops.ptpeft_fast.singular_values(features, lengths)


@_svals_op.register_fake
def _(features, lengths):
    return features.new_empty((features.shape[0], min(features.shape[1], features.shape[2])))


@torch.library.custom_op("ptpeft_fast::batched_spectrum_stats", mutates_args=())
def _stats_op(features: torch.Tensor, lengths: Optional[torch.Tensor],
              threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if features.is_cuda and features.dtype == torch.float32:
        features = features.double()  # see _svals_op
    return tuple(t.clone() for t in torch.ops.ptpeft_fast.spectrum_stats(features, lengths, threshold))


@_stats_op.register_fake
def _(features, lengths, threshold):
    K = torch.library.get_ctx().new_dynamic_size() if lengths is not None else min(features.shape[1], features.shape[2])
    f64 = dict(dtype=torch.float64, device="cpu")
    return (torch.empty(K, **f64), torch.empty(K, **f64), torch.empty((), **f64), torch.empty((), **f64))


def _validate(
    features: torch.Tensor, lengths: torch.Tensor | None, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be 3-D [batch, tokens, dim]; got a {features.dim()}-D tensor of shape "
                         f"{tuple(features.shape)}")
    if features.size(0) == 0:
        raise ValueError("features is an empty batch (batch size 0)")
    if features.size(1) == 0 or features.size(2) == 0:
        raise ValueError(f"features has an empty token or feature dimension: shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got {features.dtype}")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()  # fp16/bf16: the Gram matrix needs fp32 range and precision
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.size(0) != features.size(0):
            raise ValueError(f"lengths must be 1-D with one entry per sample ({features.size(0)}), got shape "
                             f"{tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        lengths = lengths.to(device="cpu", dtype=torch.int64)
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > features.size(1):
            raise ValueError(f"lengths must lie in [1, {features.size(1)}] (tokens); got min {lo}, max {hi}")
    # NaN/Inf never become a spectrum. The csrc kernels detect them for free on the Gram
    # diagonal (Σ x² is non-finite iff a row/column is) and raise ValueError naming the sample,
    # so the extra full pass over the features (~15% of the op's time) is only made here.
    if check_finite:
        nonfinite = ~torch.isfinite(features)
        if lengths is not None:  # rows beyond a sample's length are ignored, whatever they hold
            nonfinite &= (torch.arange(features.size(1)) < lengths[:, None]).to(features.device)[:, :, None]
        if bool(nonfinite.any()):
            bad = nonfinite.flatten(1).any(1).nonzero().flatten()[:5].tolist()
            raise ValueError(f"features contain NaN or Inf (samples {bad})")
    return features, lengths


def _ranks(features: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    d = features.size(2)
    if lengths is None:
        return torch.full((features.size(0),), min(features.size(1), d), dtype=torch.int64)
    return lengths.clamp(max=d)


def _torch_singular_values(features: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    x = features
    if lengths is not None:
        # Zero rows leave the non-zero singular values unchanged (F^T F is the same).
        keep = (torch.arange(x.size(1)) < lengths[:, None]).to(x.device)[:, :, None]
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    s = torch.linalg.svdvals(x)
    if lengths is not None:
        # Exactly zero beyond min(length, d) instead of round-off noise.
        valid = torch.arange(s.size(1)) < _ranks(features, lengths)[:, None]
        s = s * valid.to(device=s.device, dtype=s.dtype)
    return s


def curve_statistics(mean_spectrum: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """Accumulated curve c_k = Σ_{i≤k} p̄_i and the remaining-rank ratio: smallest k/K with c_k ≥ τ
    (1.0 when round-off keeps the curve below τ)."""
    curve = torch.cumsum(mean_spectrum.to(torch.float64), 0)
    K = curve.numel()
    hit = (curve >= threshold).nonzero()
    k = int(hit[0]) + 1 if hit.numel() else K
    return curve, k / K


def stats_from_singular_values(svals: torch.Tensor, ranks: torch.Tensor, threshold: float) -> RawSpectrumStats:
    """Statistics of design §1 from descending singular values [B, ≥K] (torch ops, float64).

    ``ranks[b]`` = min(length_b, d); K = max(ranks). Raises ``ValueError`` for an all-zero sample.
    """
    K = int(ranks.max())
    s = svals[:, :K].to(torch.float64)
    s = s * (torch.arange(K, device=s.device) < ranks.to(s.device)[:, None])
    total = s.sum(1, keepdim=True)
    if bool((total <= 0).any()):
        b = int((total.flatten() <= 0).nonzero()[0])
        raise ValueError(f"sample {b} has all-zero features: its normalised spectrum is undefined")
    p = s / total
    ent = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1)  # 0 log 0 = 0
    mean_p = p.mean(0)
    curve, ratio = curve_statistics(mean_p, threshold)
    return RawSpectrumStats(
        mean_p.cpu(), curve.cpu(), torch.tensor(ratio, dtype=torch.float64), torch.exp(ent).mean().cpu()
    )


@torch.no_grad()
def singular_values(features: torch.Tensor, lengths: torch.Tensor | None = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """Singular values of each sample's features, descending, ``[B, min(L, d)]``.

    ``features``: ``[B, L, d]`` (fp16/bf16 are computed in fp32). ``lengths``: optional ``[B]``
    numbers of valid rows; rows beyond are ignored and values beyond ``min(length, d)`` are 0.
    """
    features, lengths = _validate(features, lengths, check_finite=False)
    if resolve_spectrum_backend(backend, features) == "csrc":
        return _svals_op(features.detach(), lengths)
    _validate(features, lengths)
    return _torch_singular_values(features.detach(), lengths)


@torch.no_grad()
def spectrum_stats(
    features: torch.Tensor, lengths: torch.Tensor | None = None, threshold: float = 0.9, *, backend: str = "auto"
) -> RawSpectrumStats:
    """Fused batch statistics (see :class:`RawSpectrumStats`), K = max_b min(length_b, d)."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    features, lengths = _validate(features, lengths, check_finite=False)
    if resolve_spectrum_backend(backend, features) == "csrc":
        return RawSpectrumStats(*_stats_op(features.detach(), lengths, float(threshold)))
    _validate(features, lengths)
    s = _torch_singular_values(features.detach(), lengths)
    return stats_from_singular_values(s, _ranks(features, lengths), float(threshold))
