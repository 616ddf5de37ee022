"""Multi-run experiments: ``experiment.methods`` × ``experiment.variants`` ×
``experiment.per_class`` × ``experiment.seeds`` (seed by seed), one :class:`Run` each (in its own
sub-folder, resumed when it already has progress), aggregated into one ``results.md``
(mean ± sample std over seeds; rewritten after every seed) and ``spectrum.png`` (mean curve over
seeds).

Used by the shipped presets ``minilm-docstrings.yaml`` (the PT-PEFT comparison),
``minilm-reparam.yaml`` (seed 2's reparameterisation ablation) and ``smollm2-code-captions.yaml``
(PT-PEFT on a real decoder, scored as captions).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Callable

from . import report, run_folder
from .comparison_report import default_pairs, paired_section, spectrum_value, validation_section
from .experiment_runs import Stage1Sources, method_run_config, run_one
from .lr_sweep import run_lr_sweep
from .methods import METHODS, SEED_FREE
from .packed_batches import batches_note
from .report import mean_pm_std


def _budget(stage: dict) -> str:
    if not stage["enabled"]:
        return "off"
    return f"{stage['max_steps']} steps" if stage["max_steps"] else f"{stage['epochs']} epoch(s)"



def run_experiment(base: dict, out: str, log: Callable[[str], None] = print) -> dict:
    """Run every (per_class, variant, method, seed) of ``base['experiment']`` under ``out``;
    returns ``{"groups", "results", "png", "seconds"}``."""
    from ..data.stdlib_docstrings import python_version
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    sources = Stage1Sources()
    sweep = None
    if base["experiment"]["lr_sweep"]:
        sweep = run_lr_sweep(base, out, sources, log)
        base = with_swept_rates(base, sweep)
    ex = base["experiment"]
    pcs = list(ex["per_class"]) or [base["data"]["per_class"]]
    variants = list((ex["variants"] or {}).items()) or [("", [])]
    title = None  # the task's report title, from its first run
    groups: list[dict] = []
    for pc in pcs:
        for vname, vov in variants:
            # seed by seed, every method of a seed before the next seed: an interrupted experiment
            # has whole seeds (every pair PT-X / X) rather than whole methods
            gs = {m: {"per_class": pc, "variant": vname, "method": METHODS[m][0], "key": m, "rows": []}
                  for m in ex["methods"]}
            groups += gs.values()
            for seed in ex["seeds"]:
                for m in ex["methods"]:
                    if m in SEED_FREE and seed != ex["seeds"][0]:
                        continue
                    parts = ([f"pc{pc}"] if len(pcs) > 1 else []) + ([vname] if vname else []) + [m, f"seed{seed}"]
                    sub = os.path.join(out, *parts)
                    cfg = method_run_config(base, m, seed, sub,
                                            list(vov) + ([f"data.per_class={pc}"] if pc is not None else []))
                    log(f"--- {'/'.join(parts)} ---")
                    t = time.time()
                    run, rows = run_one(cfg, sub, sources, log)
                    title = title or run.task.report_title(run.cfg)
                    row = dict(rows[-1])
                    row["seconds"] = round(time.time() - t, 1)
                    row["seed"] = seed
                    row["out"] = sub
                    # training time, the adopted stage 1 counted at what its source run spent on it
                    row["train_seconds"] = _stage_seconds(sub) + (
                        _stage_seconds(run.stage1_from, "stage1") if run.stage1_from else 0.0)
                    row["n_train"] = len(run.train_ds) if run.train_ds is not None else 0
                    gs[m]["rows"].append(row)
                    _atomic_json(os.path.join(out, "groups.json"), [g for g in groups if g["rows"]])
                # the report so far, after every seed: an interrupted experiment has one for its whole seeds
                write_experiment_report(out, [g for g in groups if g["rows"]], base, python_version(),
                                        time.time() - t0, title, sweep)
    secs = time.time() - t0
    md, png = write_experiment_report(out, groups, base, python_version(), secs, title, sweep)
    log("\n" + open(md, encoding="utf-8").read())
    return {"groups": groups, "results": md, "png": png, "seconds": secs}


def _stage_seconds(out: str, stage: str | None = None) -> float:
    return sum(float(r["seconds"]) for r in run_folder.read_records(out, "stage")
               if stage is None or r["stage"] == stage)


def with_swept_rates(base: dict, sweep: dict) -> dict:
    """``base`` with the sweep's choices: ``stage1.lr`` for every run, ``stage2.lr`` per method
    (after the method's own overrides, so the sweep has the last word)."""
    base = copy.deepcopy(base)
    if sweep["stage1"] is not None:
        base["stage1"]["lr"] = sweep["stage1"]
    mo = base["experiment"]["method_overrides"] = dict(base["experiment"]["method_overrides"] or {})
    for m, lr in sweep["stage2"].items():
        mo[m] = list(mo.get(m, [])) + [f"stage2.lr={lr}"]
    return base


def _atomic_json(path: str, obj) -> None:
    from ..atomic_files import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=1))


def write_experiment_report(out: str, groups: list[dict], base: dict, py: str, seconds: float,
                            title: str | None = None, sweep: dict | None = None) -> tuple[str, str | None]:
    """``results.md`` (mean ± std over seeds, then the paired differences of ``experiment.compare``
    and the validation loss by step) and ``spectrum.png`` (mean curves); the task (``data.task``)
    picks the metric columns, ``title`` heads the file, ``sweep`` is the learning-rate sweep's choice."""
    ex, ev, dc = base["experiment"], base["eval"], base["data"]
    kind = dc["task"]
    names = report.metric_names(kind)
    # a metric no run could compute (METEOR without Java: None) gets no column
    present = {k for g in groups for r in g["rows"] for k, v in r["metrics"].items() if v is not None}
    names = [n for n in names if n in present]
    multi_pc = len({g["per_class"] for g in groups}) > 1
    multi_var = len({g["variant"] for g in groups}) > 1
    pooled = any((r.get("spectrum") or {}).get("pooled") for g in groups for r in g["rows"])
    timed = any(r.get("train_seconds") for g in groups for r in g["rows"])
    cols = (["per class"] if multi_pc else []) + (["variant"] if multi_var else []) + [
        "method", *names, "remaining-rank ratio", "effective rank",
        *(["pooled rank ratio", "pooled eff. rank"] if pooled else []), "trainable params", "train size", "s / run",
        *(["train s / run"] if timed else [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    curves: dict[str, list[float]] = {}
    spectrum_note = ""
    for g in groups:
        rs = g["rows"]
        sp = [r["spectrum"] for r in rs if r.get("spectrum")]
        rr = [s["remaining_rank_ratio"] for s in sp]
        er = [s["effective_rank"] for s in sp]
        name = " / ".join(str(x) for x in ([f"{g['per_class']}/class"] if multi_pc else []) +
                          ([g["variant"]] if multi_var else []) + [g["method"]])
        if sp:
            K = len(sp[0]["curve"])
            if sp[0].get("pooled") and not sp[0].get("window"):  # the pooled one resolves what per-sample cannot
                sp_curves = [s["pooled"]["curve"] for s in sp]
                K = min(len(c) for c in sp_curves)
                curves[name] = [sum(c[k] for c in sp_curves) / len(sp_curves) for k in range(K)]
            else:
                curves[name] = [sum(s["curve"][k] for s in sp) / len(sp) for k in range(K)]
            s0 = sp[0]
            if s0.get("window"):
                spectrum_note = (
                    f"Spectrum: last-layer token features of the first {s0.get('window')} word-piece tokens "
                    f"([CLS]/[SEP] excluded) of {s0['n_samples']} evaluation sentences; "
                    f"{s0.get('skipped_short', 0)} of the first {s0.get('considered', s0['n_samples'])} "
                    f"sentences were shorter than the window and skipped.")
            elif s0.get("pooled"):
                text = "prompt and reference-caption" if ev["spectrum_text"] == "prompt+target" else "prompt"
                spectrum_note = (
                    f"Spectrum: last-layer features of every {text} "
                    f"token (padding removed) of the first {s0['n_samples']} evaluation records; the pooled columns "
                    f"stack all {s0['pooled']['n_tokens']} tokens into one matrix (its singular values; the curve "
                    "plotted is the pooled one).")
            else:
                spectrum_note = (f"Spectrum: last-layer features of every prompt token (padding removed) of the "
                                 f"first {s0['n_samples']} evaluation records.")
        pooled_cols = [mean_pm_std([x for x in (spectrum_value(r, key) for r in rs) if x is not None], digits)
                       for key, digits in (("remaining_rank_ratio", 3), ("effective_rank", 2))] if pooled else []
        seeds = f" ({len(rs)} seed)" if len(rs) < len(ex["seeds"]) else ""
        vals = ([str(g["per_class"])] if multi_pc else []) + ([g["variant"]] if multi_var else []) + [
            g["method"] + seeds,
            *[mean_pm_std([r["metrics"][n] for r in rs if r["metrics"].get(n) is not None]) for n in names],
            mean_pm_std(rr, 3), mean_pm_std(er),
            *pooled_cols,
            str(rs[-1].get("trainable", 0)),
            str(rs[-1].get("n_train", "")), f"{sum(r['seconds'] for r in rs) / len(rs):.0f}",
            *([f"{sum(r.get('train_seconds', 0) for r in rs) / len(rs):.0f}"] if timed else [])]
        lines.append("| " + " | ".join(vals) + " |")
    n_eval = groups[0]["rows"][0].get("n") if groups and groups[0]["rows"] else None
    classification = kind == "classification"
    title = title or f"{base['model']['name']} on {dc['format']}"
    corpus = (f"- Python {py} (the corpus depends on the Python minor version); split seed {dc['split_seed']}\n"
              if dc["format"].startswith("stdlib-") else "")
    seed_means = ("the head/PT-PEFT init, the data order and which training sentences are kept per class"
                  if classification else "the PT-PEFT init and the data order")
    scores = "accuracy and macro-F1 ×100" if classification else ", ".join(names) + " ×100 (pycocoevalcap)"
    unit = "sentences" if classification else "records"
    head = (f"# {title}: {', '.join(METHODS[m][0] for m in ex['methods'])}\n\n"
            f"{corpus}"
            f"- seeds {ex['seeds']}: mean ± sample std over seeds (a seed sets {seed_means})\n"
            f"- evaluated on the `{ev['split']}` split ({n_eval} {unit}); {scores}\n"
            f"- stage budgets: stage 1 {_budget(base['stage1'])}, stage 2 {_budget(base['stage2'])}; "
            f"a PT- method runs both\n"
            f"- {batches_note(base)}\n"
            f"- time: {sum(r['seconds'] for g in groups for r in g['rows']) / 60:.1f} min summed over the runs "
            f"(wall time of the invocation that wrote this file: {seconds / 60:.1f} min)\n\n")
    if sweep is not None:
        chosen = ([f"stage 1 {sweep['stage1']:g}"] if sweep["stage1"] is not None else []) + [
            f"{METHODS[m][0]} stage 2 {lr:g}" for m, lr in sweep["stage2"].items()]
        head += (f"Learning rates chosen on the validation split (seed {sweep['seed']}, lowest final validation "
                 f"loss; `lr_sweep.md`): {', '.join(chosen)}.\n\n")
    if timed:
        head += ("`train s / run`: training time of a run; a PT- run's includes the stage 1 it took from the "
                 "Prefix run of its seed. `s / run`: the wall time of this invocation's part of the run "
                 "(evaluation included).\n\n")
    md = head + "\n".join(lines) + "\n"
    pairs = ex["compare"] or default_pairs(ex["methods"])
    if names and pairs:
        section = paired_section(groups, pairs, names[0])
        md += ("\n" + section) if section else ""
    val = validation_section(groups, out)
    md += ("\n" + val) if val else ""
    png = None
    if curves and ex["spectrum"]:
        png = report.plot_spectra(curves, run_folder.spectrum_path(out), ev["tau"])
        md += (f"\n{spectrum_note} Remaining-rank ratio: smallest k/K whose cumulative normalised singular-value "
               f"mass ≥ {ev['tau']}; effective rank: exp(entropy) of each sample's normalised spectrum, "
               "averaged over samples.\n\n"
               "![spectrum](spectrum.png)\n")
    return run_folder.write_results(out, md), png
