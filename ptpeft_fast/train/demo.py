"""The embedded default: ``python -m ptpeft_fast.train`` with no arguments.

1. Pre-train ``tiny-blip2`` on synthetic-shapes captions (cached; see :mod:`.pretrain`).
2. Adapt it to synthetic-shapes VQA with zero-shot, prefix only, LoRA, PT-LoRA, Adapter
   and PT-Adapter (same seed, data and step budget per stage for every method).
3. Write ``results.md`` (VQA accuracy, remaining-rank ratio, effective rank) and
   ``spectrum.png`` comparing the last-layer feature spectra, and print both.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

from . import report, run_folder
from .config import apply_override, validate
from .evaluation import write_report
from .pretrain import ensure_tiny_pretrained, recipe_path
from .tasks import make_run

# Learning rates picked per method on the val split (LoRA diverges at the adapter's rate);
# a PT- method uses the same stage-2 rate as its single-stage counterpart.
LORA_LR, ADAPTER_LR = "stage2.lr=5e-3", "stage2.lr=2e-2"

# (label, overrides) for each method of the comparison
METHODS: list[tuple[str, list[str]]] = [
    ("zero-shot", ["stage1.enabled=false", "stage2.enabled=false", "eval.zero_shot=true"]),
    ("prefix", ["stage1.enabled=true", "stage2.enabled=false"]),
    ("lora", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=lora", LORA_LR]),
    ("pt-lora", ["stage1.enabled=true", "stage2.enabled=true", "stage2.method=lora", LORA_LR]),
    ("adapter", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=adapter", ADAPTER_LR]),
    ("pt-adapter", ["stage1.enabled=true", "stage2.enabled=true", "stage2.method=adapter", ADAPTER_LR]),
]

# The demo's VQA settings; --quick shrinks data and steps so the whole demo fits in ~2 min.
FULL = ["data.task=vqa", "data.train.n=1500", "data.val.n=150", "stage1.max_steps=300", "stage2.max_steps=300",
        "stage1.lr=1e-2", "stage1.batch_size=32", "stage2.batch_size=32",
        "eval.max_new_tokens=3", "eval.spectrum_samples=128", "eval.zero_shot=false",
        "eval.after_each_stage=false", "train.log_every=20",
        "train.num_threads=1"]  # tiny ops: one thread is as fast on an idle machine, much faster on a busy one
QUICK = ["data.train.n=300", "data.val.n=40", "stage1.max_steps=60", "stage2.max_steps=60",
         "eval.spectrum_samples=32"]


def demo_config(quick: bool, user_overrides: list[str] | None = None) -> dict:
    """The demo's base config (before the per-method overrides)."""
    from .config import load_config
    return load_config(None, FULL + (QUICK if quick else []) + list(user_overrides or []))


def run_demo(quick: bool = False, out_dir: str | None = None, user_overrides: list[str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole comparison; returns ``{"rows", "results", "png", "seconds"}``."""

    t0 = time.time()
    base = demo_config(quick, user_overrides)
    out = out_dir or base["output"]["dir"] or os.path.join("runs", "demo-quick" if quick else "demo")
    os.makedirs(out, exist_ok=True)
    if base["model"]["name"] == "tiny-blip2" and base["model"]["pretrained_path"] is None:
        full = recipe_path("full")
        if quick and os.path.isfile(os.path.join(full, "config.json")):
            base["model"]["pretrained_path"] = full  # the better model is free once cached
        else:
            base["model"]["pretrained_path"] = ensure_tiny_pretrained(
                "quick" if quick else "full", log=log, progress=base["train"]["progress"])
    rows = []
    for label, ov in METHODS:
        cfg = copy.deepcopy(base)
        for o in ov + list(user_overrides or []):  # the user's --set wins over the method's defaults
            apply_override(cfg, o)
        validate(cfg)
        sub = os.path.join(out, label)
        cfg["output"]["dir"] = sub
        log(f"--- {label} ---")
        t = time.time()
        run_rows = make_run(cfg, sub, resume=run_folder.has_progress(sub), log=log).execute()
        final = dict(run_rows[-1])
        final["method"] = {"zero-shot": "zero-shot (pre-trained)", "prefix": "Prefix", "lora": "LoRA",
                           "pt-lora": "PT-LoRA", "adapter": "Adapter", "pt-adapter": "PT-Adapter"}[label]
        final["seconds"] = round(time.time() - t, 1)
        rows.append(final)
    md, png = write_report(out, rows, "vqa", base["eval"]["tau"],
                           title="PT-PEFT demo: tiny-blip2 adapted to synthetic-shapes VQA")
    table = report.results_table(rows, report.metric_names("vqa"))
    secs = time.time() - t0
    log("\n" + table)
    log(f"results: {md}\nspectrum plot: {png}\n(total {secs:.0f}s)")
    return {"rows": rows, "results": md, "png": png, "seconds": secs}
