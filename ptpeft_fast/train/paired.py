"""Paired comparisons of two methods over the same seeds: per-seed differences, a 95 % t-interval
over seeds, a 95 % bootstrap interval over evaluation records within each seed, and the verdict
the interval gives.

A seed fixes the initialisation and the data order, so method A's seed-s run and method B's
seed-s run differ only by the method: their difference is the paired observation. The verdict on
"A is higher than B" is *supported* when the whole interval over seeds is above 0, *not
supported* when it is below 0 (B is higher), and *undecided* when it contains 0.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["t_quantile", "t_interval", "bootstrap_mean_interval", "verdict", "PairedResult", "paired"]

# two-sided 95 %: the 0.975 quantile of Student's t with df = 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the normal's beyond 30)."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def t_interval(xs: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95 % t-interval (``low == high == mean`` for one value)."""
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval: no values")
    m = sum(xs) / n
    if n == 1:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def bootstrap_mean_interval(xs: Sequence[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and the 2.5 / 97.5 percentiles of the means of ``rounds``
    resamples (with replacement) of ``xs``; seeded, so a report is reproducible."""
    n = len(xs)
    if n == 0:
        raise ValueError("bootstrap_mean_interval: no values")
    rng = random.Random(seed)
    means = sorted(sum(xs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return sum(xs) / n, means[int(0.025 * (rounds - 1))], means[int(math.ceil(0.975 * (rounds - 1)))]


def verdict(low: float, high: float) -> str:
    """The words for "the first method is higher" given a 95 % interval of the difference."""
    if low > 0:
        return "supported"
    if high < 0:
        return "not supported"
    return "undecided"


@dataclass(frozen=True)
class PairedResult:
    """``a - b`` per seed (``seeds`` in order), their mean with its 95 % t-interval and verdict, and
    per seed the 95 % bootstrap interval over records (empty when no per-record scores exist)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float
    high: float
    verdict: str
    per_seed_bootstrap: tuple[tuple[float, float, float], ...] = ()


def paired(a: Mapping[int, float], b: Mapping[int, float],
           a_records: Mapping[int, Mapping[str, float]] | None = None,
           b_records: Mapping[int, Mapping[str, float]] | None = None) -> PairedResult:
    """Compare ``a`` and ``b`` (seed -> score) over the seeds both have; with per-record scores
    (seed -> record id -> score) also bootstrap each seed's mean record difference."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError("paired: the two methods share no seed")
    diffs = tuple(a[s] - b[s] for s in seeds)
    m, lo, hi = t_interval(diffs)
    boots: list[tuple[float, float, float]] = []
    if a_records and b_records and all(s in a_records and s in b_records for s in seeds):
        for s in seeds:
            ids = sorted(set(a_records[s]) & set(b_records[s]))
            boots.append(bootstrap_mean_interval([a_records[s][i] - b_records[s][i] for i in ids], seed=s))
    word = verdict(lo, hi) if len(seeds) > 1 else "undecided (one seed: no interval)"
    return PairedResult(seeds, diffs, m, lo, hi, word, tuple(boots))
