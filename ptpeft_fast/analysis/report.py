"""Tables and figures comparing spectra (the paper's Figure 4 style)."""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .spectrum import SpectrumStats

__all__ = ["ComparisonTable", "compare", "plot", "spectrum_figure"]

_COLUMNS = ("name", "n_samples", "K", "remaining_rank_ratio", "effective_rank", "delta_remaining_rank_ratio",
            "delta_effective_rank")


@dataclass
class ComparisonTable:
    """Rows of :func:`compare`; deltas are relative to the first entry (e.g. the pretrained model)."""

    rows: list[dict]
    threshold: float

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table."""
        head = ["model", "samples", "K", f"remaining-rank ratio (τ={self.threshold:g})", "effective rank", "Δ ratio",
                "Δ eff. rank"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append(
                f"| {r['name']} | {r['n_samples']} | {r['K']} | {r['remaining_rank_ratio']:.4f} | "
                f"{r['effective_rank']:.2f} | {r['delta_remaining_rank_ratio']:+.4f} | "
                f"{r['delta_effective_rank']:+.2f} |"
            )
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (written to ``path`` too when given)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def __str__(self) -> str:
        return self.to_markdown()


def compare(stats: Mapping[str, SpectrumStats]) -> ComparisonTable:
    """Table of remaining-rank ratio and effective rank per entry, with deltas to the first."""
    if not stats:
        raise ValueError("compare() needs at least one entry")
    items = list(stats.items())
    taus = {s.threshold for _, s in items}
    if len(taus) > 1:
        raise ValueError(f"entries use different thresholds {sorted(taus)}; compare like with like")
    ref = items[0][1]
    rows = [
        {
            "name": name,
            "n_samples": s.n_samples,
            "K": s.K,
            "remaining_rank_ratio": s.remaining_rank_ratio,
            "effective_rank": s.effective_rank,
            "delta_remaining_rank_ratio": s.remaining_rank_ratio - ref.remaining_rank_ratio,
            "delta_effective_rank": s.effective_rank - ref.effective_rank,
        }
        for name, s in items
    ]
    return ComparisonTable(rows, threshold=taus.pop())


def spectrum_figure(stats: Mapping[str, SpectrumStats], *, title: str | None = None, threshold_line: bool = True):
    """Matplotlib figure of the accumulated normalised spectra (one labelled curve per entry).

    The x axis is the normalised index k/K so spectra of different K share one scale.
    """
    # A bare Figure (no pyplot) renders with the Agg canvas on savefig: headless, no global state.
    from matplotlib.figure import Figure

    if not stats:
        raise ValueError("plot() needs at least one entry")
    fig = Figure(figsize=(6.4, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for name, s in stats.items():
        K = s.K
        xs = [k / K for k in range(K + 1)]  # c_0 = 0: the curve starts at the origin
        ax.plot(xs, [0.0] + s.curve.tolist(), linewidth=2.0,
                label=f"{name} (ratio {s.remaining_rank_ratio:.3f}, eff. rank {s.effective_rank:.1f})", gid="curve")
    if threshold_line:
        tau = next(iter(stats.values())).threshold
        ax.axhline(tau, color="0.5", linestyle="--", linewidth=1.0, label=f"τ = {tau:g}", gid="threshold")
    ax.set_xlabel("normalised singular-value index k / K", fontsize=12)
    ax.set_ylabel("accumulated normalised singular values", fontsize=12)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=11)
    ax.legend(loc="lower right", fontsize=10, frameon=True)
    if title:
        ax.set_title(title, fontsize=13)
    return fig


def plot(stats: Mapping[str, SpectrumStats], path: str | Path, *, title: str | None = None,
         threshold_line: bool = True) -> Path:
    """Write the accumulated-spectrum figure (paper Figure 4 style) as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = spectrum_figure(stats, title=title, threshold_line=threshold_line)
    fig.savefig(path, format="png")
    return path
