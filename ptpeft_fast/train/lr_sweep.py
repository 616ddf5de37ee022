"""The learning rates of an experiment, chosen on the validation split before any test run.

``experiment.lr_sweep`` in a config::

    lr_sweep:
      seed: 100                      # one seed, not one of experiment.seeds
      steps: 100                     # optional: each stage's steps in a sweep run (default: the experiment's)
      grid:
        stage1: [2.0e-3, 5.0e-3, 1.0e-2]   # the prefix stage (Prefix and every PT- method)
        lora: [5.0e-4, 1.0e-3, 2.0e-3]     # stage 2 of that method
        pt-lora: [5.0e-4, 1.0e-3, 2.0e-3]

Each grid value is one run (of ``steps`` per stage) with ``eval.val_every`` on and no
test evaluation; the value whose run ends with the lowest validation loss wins. ``stage1`` is
swept first (with the Prefix method) and the PT- methods' stage-2 runs start from the winner's
stage 1. The choice is written to ``lr_sweep.json`` and ``lr_sweep.md`` in the experiment folder
and applied as overrides: ``stage1.lr`` for every run, ``stage2.lr`` per method.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

from ..atomic_files import atomic_write_text
from . import run_folder
from .config import ConfigError
from .experiment_runs import Stage1Sources, method_run_config, run_one
from .loop import NonFinite

__all__ = ["run_lr_sweep"]


def _final_val_loss(out: str, stage: str) -> float:
    vals = [r for r in run_folder.read_records(out, "val") if r["stage"] == stage]
    if not vals:
        raise ConfigError(f"{out}: no validation loss recorded for {stage}")
    return float(vals[-1]["loss"])


def _lowest(losses: dict[float, float], key: str) -> float:
    if all(math.isinf(v) for v in losses.values()):
        raise NonFinite(f"experiment.lr_sweep.grid.{key}: every learning rate diverged ({sorted(losses)}); "
                        "add lower ones")
    return min(losses, key=losses.get)


def run_lr_sweep(base: dict, out: str, sources: Stage1Sources, log: Callable[[str], None] = print) -> dict:
    """Run the sweep under ``out/lr-sweep`` (resumable like the experiment) and return
    ``{"stage1": lr or None, "stage2": {method: lr}, "table": [...]}``."""
    sweep = base["experiment"]["lr_sweep"]
    grid, seed, steps = sweep["grid"], sweep["seed"], sweep.get("steps")
    root = os.path.join(out, "lr-sweep")
    table: list[dict] = []
    choice: dict = {"seed": seed, "stage1": None, "stage2": {}, "table": table}

    def one(method: str, key: str, lr: float, extra: list[str]) -> float:
        sub = os.path.join(root, key, f"lr{lr:g}")
        cfg = method_run_config(base, method, seed, sub, extra + (
            [f"stage1.max_steps={steps}", f"stage2.max_steps={steps}"] if steps else []))
        log(f"--- lr-sweep/{key}/lr{lr:g} ---")
        stage = "stage2" if key != "stage1" else "stage1"
        try:
            run_one(cfg, sub, sources, log, evaluate=False)
            loss = _final_val_loss(sub, stage)
        except NonFinite as e:  # a rate that diverges loses; the sweep goes on
            log(f"lr-sweep/{key}/lr{lr:g} diverged: {e}")
            loss = math.inf
        curve = [(r["step"], r["loss"]) for r in run_folder.read_records(sub, "val") if r["stage"] == stage]
        table.append({"key": key, "lr": lr, "val_loss": loss, "curve": curve})
        return loss

    stage1_lr = []
    if "stage1" in grid:
        losses = {lr: one("prefix", "stage1", lr, [f"stage1.lr={lr}"]) for lr in grid["stage1"]}
        choice["stage1"] = _lowest(losses, "stage1")
        stage1_lr = [f"stage1.lr={choice['stage1']}"]
    for key, lrs in grid.items():
        if key == "stage1":
            continue
        losses = {lr: one(key, key, lr, stage1_lr + [f"stage2.lr={lr}"]) for lr in lrs}
        choice["stage2"][key] = _lowest(losses, key)
    atomic_write_text(os.path.join(out, "lr_sweep.json"), json.dumps(choice, indent=1))
    _write_markdown(os.path.join(out, "lr_sweep.md"), choice, base, steps)
    return choice


def _write_markdown(path: str, choice: dict, base: dict, steps: int | None) -> None:
    s1, s2 = (steps, steps) if steps else (base["stage1"]["max_steps"], base["stage2"]["max_steps"])
    lines = [f"# Learning-rate sweep (seed {choice['seed']}, validation split)\n",
             f"Each value is one run (stage 1 {s1} steps, stage 2 {s2} steps; a PT- method's stage 2 starts "
             "from the chosen stage 1's run); the lowest final validation loss (mean target-token loss) wins. "
             "The test split is not read.\n",
             "| swept | lr | final val loss | val loss by step | chosen |", "|---|---|---|---|---|"]
    for r in choice["table"]:
        chosen = (choice["stage1"] if r["key"] == "stage1" else choice["stage2"].get(r["key"])) == r["lr"]
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in r["curve"])
        loss = "diverged" if math.isinf(r["val_loss"]) else f"{r['val_loss']:.4f}"
        lines.append(f"| {r['key']} | {r['lr']:g} | {loss} | {curve} | {'**yes**' if chosen else ''} |")
    atomic_write_text(path, "\n".join(lines) + "\n")
