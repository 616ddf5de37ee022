"""Singular-value spectrum statistics of features (design §1).

Per sample: features F (L tokens × d), singular values s, normalised p = s / Σ s. Spectra are
averaged over samples (zero-padded to K = max_i min(L_i, d)) and accumulated:
c_k = Σ_{i≤k} p̄_i. The *remaining-rank ratio* is the smallest k/K with c_k ≥ τ, and the
*effective rank* exp(−Σ p log p) (Roy & Vetterli 2007) is computed per sample and averaged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import spectrum as _op

__all__ = ["SpectrumStats", "SpectrumAccumulator", "singular_values", "spectrum_stats"]


@dataclass(frozen=True)
class SpectrumStats:
    """Spectrum statistics of a set of samples.

    Attributes:
        curve: accumulated mean normalised spectrum c_1..c_K (float64, c_K = 1).
        remaining_rank_ratio: smallest k/K with c_k ≥ ``threshold``.
        effective_rank: mean over samples of exp(−Σ p log p).
        n_samples: number of samples the statistics cover.
        mean_spectrum: mean normalised spectrum p̄ (float64, [K]).
        threshold: the τ used for ``remaining_rank_ratio``.
    """

    curve: torch.Tensor
    remaining_rank_ratio: float
    effective_rank: float
    n_samples: int
    mean_spectrum: torch.Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    threshold: float = 0.9

    @property
    def K(self) -> int:
        """Length of the (zero-padded) spectrum."""
        return int(self.curve.numel())


def singular_values(features: torch.Tensor, lengths: torch.Tensor | None = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """Singular values per sample, descending: ``[B, L, d]`` → ``[B, min(L, d)]``.

    Args:
        features: ``[B, L, d]`` float tensor (fp16/bf16 are computed in fp32).
        lengths: optional ``[B]`` integer numbers of valid rows per sample (rows beyond are
            ignored; values beyond ``min(length, d)`` are zero).
        backend: ``"auto"``, ``"csrc"`` (C++/CUDA extension) or ``"torch"`` (``torch.linalg.svdvals``).

    Raises:
        ValueError: wrong rank, empty batch, NaN/Inf, bad ``lengths``.
    """
    return _op.singular_values(features, lengths, backend=backend)


def spectrum_stats(
    features: torch.Tensor, lengths: torch.Tensor | None = None, threshold: float = 0.9, *, backend: str = "auto"
) -> SpectrumStats:
    """Statistics of one batch of features in one fused call (see :class:`SpectrumStats`)."""
    raw = _op.spectrum_stats(features, lengths, threshold, backend=backend)
    return SpectrumStats(
        curve=raw.curve.cpu(),
        remaining_rank_ratio=float(raw.remaining_rank_ratio),
        effective_rank=float(raw.effective_rank),
        n_samples=int(features.size(0)),
        mean_spectrum=raw.mean_spectrum.cpu(),
        threshold=float(threshold),
    )


class SpectrumAccumulator:
    """Streams batches of features into dataset-level :class:`SpectrumStats`.

    Keeps only the running sum of normalised spectra (float64, padded to the longest K seen)
    and of effective ranks, so memory does not grow with the dataset.

    Example::

        acc = SpectrumAccumulator()
        for feats, lengths in extract_features(model, loader):
            acc.update(feats, lengths)
        stats = acc.compute()
    """

    def __init__(self, threshold: float = 0.9, *, backend: str = "auto") -> None:
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.backend = backend
        self._sum = torch.zeros(0, dtype=torch.float64)
        self._erank_sum = 0.0
        self.n_samples = 0

    def update(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Add a batch ``[B, L, d]`` (``lengths``: optional valid rows per sample)."""
        raw = _op.spectrum_stats(features, lengths, self.threshold, backend=self.backend)
        n = int(features.size(0))
        # The op returns batch means; means × n are the sums (exact up to one rounding).
        self._add(raw.mean_spectrum.cpu() * n, float(raw.effective_rank) * n, n)

    def merge(self, other: "SpectrumAccumulator") -> None:
        """Fold another accumulator (e.g. from another worker) into this one."""
        self._add(other._sum, other._erank_sum, other.n_samples)

    def _add(self, spectrum_sum: torch.Tensor, erank_sum: float, n: int) -> None:
        K = max(self._sum.numel(), spectrum_sum.numel())
        total = torch.zeros(K, dtype=torch.float64)
        total[: self._sum.numel()] += self._sum
        total[: spectrum_sum.numel()] += spectrum_sum.to(torch.float64)
        self._sum = total
        self._erank_sum += erank_sum
        self.n_samples += n

    def compute(self) -> SpectrumStats:
        """Statistics over every sample seen so far; ``ValueError`` if none."""
        if self.n_samples == 0:
            raise ValueError("SpectrumAccumulator.compute(): no samples were added")
        mean = self._sum / self.n_samples
        curve, ratio = _op.curve_statistics(mean, self.threshold)
        return SpectrumStats(
            curve=curve,
            remaining_rank_ratio=ratio,
            effective_rank=self._erank_sum / self.n_samples,
            n_samples=self.n_samples,
            mean_spectrum=mean,
            threshold=self.threshold,
        )
