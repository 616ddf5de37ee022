"""The parts of an experiment's ``results.md`` that compare methods seed by seed: the paired
differences with their intervals and verdicts (:mod:`.paired`), and the validation loss by step
(whether the stages were long enough)."""
from __future__ import annotations

from . import run_folder
from .methods import METHODS
from .paired import PairedResult, paired

__all__ = ["default_pairs", "spectrum_value", "paired_results", "paired_section", "validation_section"]


def default_pairs(methods: list[str]) -> list[list[str]]:
    """PT-X against X for every X whose both forms the experiment runs."""
    return [[f"pt-{m}", m] for m in ("lora", "adapter", "full") if f"pt-{m}" in methods and m in methods]


def spectrum_value(row: dict, key: str) -> float | None:
    """``key`` of the row's pooled spectrum (all tokens in one matrix), else of its per-sample one."""
    sp = row.get("spectrum") or {}
    sp = sp.get("pooled") or sp
    v = sp.get(key)
    return float(v) if v is not None else None


def _by_seed(rows: list[dict], value) -> dict[int, float]:
    out = {}
    for r in rows:
        v = value(r)
        if v is not None and r.get("seed") is not None:
            out[int(r["seed"])] = v
    return out


def paired_results(groups: list[dict], pairs: list[list[str]], metric: str) -> list[tuple[str, str, dict]]:
    """Per (variant, pair): ``(context, "A vs B", {measure: PairedResult})`` for ``metric``
    (per-record bootstrap where the rows carry per-record scores) and the spectrum measures."""
    out = []
    contexts = sorted({(g["per_class"] is not None and g["per_class"], g["variant"]) for g in groups}, key=str)
    for pc, variant in contexts:
        keyed = {g["key"]: g for g in groups if (g["per_class"] is not None and g["per_class"]) == pc
                 and g["variant"] == variant}
        for a, b in pairs:
            if a not in keyed or b not in keyed:
                continue
            ra, rb = keyed[a]["rows"], keyed[b]["rows"]
            res: dict[str, PairedResult] = {}
            sa, sb = _by_seed(ra, lambda r: r["metrics"].get(metric)), _by_seed(rb, lambda r: r["metrics"].get(metric))
            if set(sa) & set(sb):
                recs = {}
                for rows, key in ((ra, "a"), (rb, "b")):
                    recs[key] = {int(r["seed"]): r["per_record"][metric] for r in rows
                                 if r.get("per_record") and metric in r["per_record"] and r.get("seed") is not None}
                res[metric] = paired(sa, sb, recs["a"] or None, recs["b"] or None)
            for key, label in (("effective_rank", "effective rank"), ("remaining_rank_ratio", "remaining-rank ratio")):
                xa = _by_seed(ra, lambda r, k=key: spectrum_value(r, k))
                xb = _by_seed(rb, lambda r, k=key: spectrum_value(r, k))
                if set(xa) & set(xb):
                    res[label] = paired(xa, xb)
            ctx = " / ".join(str(x) for x in ((f"{pc}/class",) if pc else ()) + ((variant,) if variant else ()))
            out.append((ctx, f"{METHODS[a][0]} vs {METHODS[b][0]}", res))
    return out


def paired_section(groups: list[dict], pairs: list[list[str]], metric: str) -> str:
    """Markdown: one row per pair and measure, with the per-seed differences, their mean, its 95 %
    t-interval over seeds, the verdict on "the first is higher", and the per-seed bootstrap."""
    results = paired_results(groups, pairs, metric)
    if not results:
        return ""
    lines = ["## Paired differences (first method − second, same seed)\n",
             "Per seed the two runs share the initialisation and the data order. Interval: 95 % t-interval of "
             "the mean over seeds. Verdict on \"the first is higher\": supported (interval above 0), not "
             "supported (below 0), undecided (contains 0). Per seed, in brackets: the 95 % bootstrap interval "
             "of the mean per-record difference over the evaluation records (2000 resamples).\n",
             "| comparison | measure | per seed | mean | 95 % interval | verdict | per-seed bootstrap over records |",
             "|---|---|---|---|---|---|---|"]
    for ctx, name, res in results:
        label = f"{ctx}: {name}" if ctx else name
        for measure, r in res.items():
            digits = 2 if measure == metric or measure == "effective rank" else 4
            per_seed = ", ".join(f"{d:+.{digits}f}" for d in r.differences)
            boot = "; ".join(f"[{lo:+.1f}, {hi:+.1f}]" for _, lo, hi in r.per_seed_bootstrap) or "—"
            lines.append(f"| {label} | {measure} | {per_seed} | {r.mean:+.{digits}f} | "
                         f"[{r.low:+.{digits}f}, {r.high:+.{digits}f}] | {r.verdict} | {boot} |")
    return "\n".join(lines) + "\n"


def validation_section(groups: list[dict], out: str) -> str:
    """Markdown: per method, the validation loss of its last stage by step, averaged over seeds,
    and how much it fell over the stage's last quarter (a small fall: the stage was long enough)."""
    lines = []
    for g in groups:
        curves = []
        for r in g["rows"]:
            sub = r.get("out")
            if not sub:
                continue
            recs = run_folder.read_records(sub, "val")
            last = recs[-1]["stage"] if recs else None
            curves.append({int(x["step"]): float(x["loss"]) for x in recs if x["stage"] == last})
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        mean = {s: sum(c[s] for c in curves) / len(curves) for s in steps}
        quarter = [s for s in steps if s <= steps[-1] * 0.75]
        fall = mean[quarter[-1]] - mean[steps[-1]] if quarter else float("nan")
        lines.append(f"| {g['method']} | {', '.join(f'{s}: {mean[s]:.3f}' for s in steps)} | {fall:+.3f} |")
    if not lines:
        return ""
    return ("## Validation loss by step (mean over seeds, the method's last stage)\n\n"
            "Fall over the last quarter: the loss at 75 % of the stage minus the final loss.\n\n"
            "| method | val loss by step | fall over the last quarter |\n|---|---|---|\n" + "\n".join(lines) + "\n")
