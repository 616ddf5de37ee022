"""Representation report (singular-value spectrum of last-layer language features),
``results.md`` and ``spectrum.png``."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..analysis import spectrum_stats


def mean_pm_std(xs: Sequence[float], digits: int = 2) -> str:
    """``"mean ± sample std"`` of ``xs`` (one value: itself; none: ``"n/a"``), as the reports show it."""
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def spectrum_summary(features: Sequence[torch.Tensor], tau: float = 0.9) -> dict:
    """Spectrum statistics of per-sample feature matrices (each ``[L_i, d]``) as a JSON-able
    dict: ``remaining_rank_ratio``, ``effective_rank`` (per sample, averaged), ``n_samples`` and
    ``curve`` (the mean normalised spectrum p̄, not cumulative); under ``pooled`` the same statistics of
    all samples' tokens stacked into one matrix (and ``n_tokens``), which resolve small differences;
    :func:`ptpeft_fast.analysis.spectrum_stats` computes them (design §1)."""
    lengths = [int(f.shape[0]) for f in features]
    L, d = max(lengths), int(features[0].shape[1])
    padded = torch.zeros(len(features), L, d, dtype=torch.float32)
    for i, f in enumerate(features):
        padded[i, : f.shape[0]] = f
    # torch backend: the eval set is small, and the C++ extension would be compiled on first use
    st = spectrum_stats(padded, torch.tensor(lengths), threshold=tau, backend="torch")
    pooled = torch.cat([f.float() for f in features])
    ps = spectrum_stats(pooled[None], torch.tensor([pooled.shape[0]]), threshold=tau, backend="torch")
    return {"remaining_rank_ratio": float(st.remaining_rank_ratio), "effective_rank": float(st.effective_rank),
            "n_samples": int(st.n_samples), "curve": [float(x) for x in st.mean_spectrum.tolist()],
            # every token of every sample in one matrix: K = min(tokens, d) singular values, so the ratio
            # moves in steps of 1/K (1/d), where a per-sample window of L tokens moves it in steps of 1/L
            "pooled": {"remaining_rank_ratio": float(ps.remaining_rank_ratio),
                       "effective_rank": float(ps.effective_rank), "n_tokens": int(pooled.shape[0]),
                       "curve": [float(x) for x in ps.mean_spectrum.tolist()]}}


def plot_spectra(curves: Mapping[str, Sequence[float]], path: str, tau: float = 0.9) -> str:
    """Plot cumulative normalised spectra, one line per method; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        c = list(c)
        K = len(c)
        x = [(i + 1) / K for i in range(K)]
        cum, acc = [], 0.0
        for v in c:
            acc += v
            cum.append(acc)
        axes[0].plot(range(1, K + 1), c, label=name)
        axes[1].plot(x, cum, label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("singular value index")
    axes[0].set_ylabel("normalised singular value p_k")
    axes[1].axhline(tau, color="grey", lw=0.8, ls="--")
    axes[1].set_xlabel("k / K")
    axes[1].set_ylabel("cumulative mass")
    axes[1].legend(fontsize=8)
    fig.suptitle("Last-layer language features: singular-value spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def results_table(rows: Iterable[Mapping[str, Any]], metric_names: Sequence[str]) -> str:
    """Markdown table: method × metrics × remaining-rank ratio × effective rank."""
    cols = ["method", *metric_names, "remaining-rank ratio", "effective rank", "trainable params"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        sp = r.get("spectrum") or {}
        vals = [r["method"], *[r.get("metrics", {}).get(m) for m in metric_names],
                sp.get("remaining_rank_ratio"), sp.get("effective_rank"), r.get("trainable")]
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def metric_names(task: str) -> list[str]:
    """The metric columns of the results table for ``task``."""
    if task == "classification":
        return ["accuracy", "macro-F1"]
    return ["VQA-acc"] if task == "vqa" else ["CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"]
