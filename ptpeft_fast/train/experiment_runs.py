"""One run of a multi-run experiment in its sub-folder (resumed when it has progress), taking its
stage 1 from an earlier run of the experiment that trained the same one.

PT-LoRA, PT-Adapter and Prefix with the same seed train the same stage 1 (the prefix alone, the
same data order); the experiment trains it once and the others start stage 2 from its prefix
(:meth:`~.runner.Run.adopt_stage1`). That also makes the Prefix row exactly the stage 1 the PT-
methods continue from.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

from . import run_folder
from .config import apply_override, validate
from .methods import METHODS

__all__ = ["method_run_config", "stage1_key", "Stage1Sources", "run_one"]


def method_run_config(base: dict, method: str, seed: int, out: str, extra: list[str] = ()) -> dict:
    """The config of one run of the experiment ``base``: ``method`` (its overrides, then
    ``experiment.method_overrides[method]``, then ``extra``) on ``seed``, writing to ``out``; checked,
    and with no experiment of its own."""
    cfg = copy.deepcopy(base)
    cfg["experiment"].update(methods=[], lr_sweep={}, compare=[])
    ovs = (list(METHODS[method][1]) + list((base["experiment"]["method_overrides"] or {}).get(method, []))
           + list(extra) + [f"train.seed={seed}"])
    for o in ovs:
        apply_override(cfg, o)
    validate(cfg)
    cfg["output"]["dir"] = out
    return cfg


def stage1_key(cfg: dict) -> str | None:
    """What determines a run's stage 1 (model, data, stage-1 settings, run-wide training settings),
    as one string; None when the run has no stage 1."""
    if not cfg["stage1"]["enabled"]:
        return None
    return json.dumps({k: cfg[k] for k in ("model", "data", "stage1", "train")}, sort_keys=True, default=str)


class Stage1Sources:
    """The finished stage 1 of the experiment's runs so far, by :func:`stage1_key`."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}

    def source_for(self, cfg: dict) -> str | None:
        key = stage1_key(cfg)
        return self.by_key.get(key) if key is not None else None

    def add(self, cfg: dict, out: str) -> None:
        key = stage1_key(cfg)
        if key is not None and key not in self.by_key and "stage1" in run_folder.read_progress(out):
            self.by_key[key] = out


def run_one(cfg: dict, sub: str, sources: Stage1Sources, log: Callable[[str], None], evaluate: bool = True):
    """Run (or continue) ``cfg`` in ``sub``; returns ``(run, rows)``. ``evaluate=False``: the stages
    only (the validation loss is what a learning-rate sweep reads)."""
    from .tasks import make_run
    run = make_run(cfg, sub, resume=run_folder.has_progress(sub), log=log)
    run.evaluate_after = evaluate
    run.stage1_from = sources.source_for(cfg)
    rows = run.execute()
    sources.add(cfg, sub)
    return run, rows
