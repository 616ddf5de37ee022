"""The ``Task`` protocol: everything that differs between training tasks.

A :class:`~ptpeft_fast.train.runner.Run` does what every task shares (phases, patching, the
stage loop, checkpoints, resume, the report); a task says how to build its model and data, how
to batch and score them, and how to evaluate. Tasks: ``caption`` and ``vqa``
(:mod:`.generation`), ``classification`` (:mod:`.classification`); :mod:`.tasks` picks one for a
config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from .distributed import DistInfo

__all__ = ["Task", "RunContext", "TaskData", "EvalResult", "method_label"]


@dataclass
class TaskData:
    """The items a run trains and evaluates on (indexable; ``train`` is None when no stage trains)."""

    train: Sequence | None
    eval: Sequence
    val: Sequence | None = None  # training items of the validation split (``eval.val_every``)


@dataclass
class EvalResult:
    """One evaluation, as the run records it (only the main process has one)."""

    metrics: dict            # metric name -> value; ``"n"``: how many items were scored
    predictions: str         # the text of ``predictions/<phase>.json``
    spectrum: dict | None    # ``report.spectrum_summary`` of the last-layer features, or None
    extra: dict = field(default_factory=dict)  # more fields for the result row (e.g. the Python version)
    note: str = ""           # appended to the log line


class RunContext(Protocol):
    """What a task may use of the run that drives it."""

    cfg: dict
    out: str
    device: torch.device
    di: DistInfo
    fsdp: bool
    model: torch.nn.Module
    processor: Any
    data: TaskData
    eval_collate: Callable[[list], dict]
    target_collate: Callable[[list], dict]  # training items -> one padded batch (never packed)

    def log(self, msg: str) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def seed(self, offset: int = 0) -> None: ...

    def model_inputs(self, batch: dict) -> dict: ...


class Task(Protocol):
    """What a task provides. ``kind`` names its metrics in the report (``report.metric_names``);
    ``head`` is a module trained in every stage (patched or not), or None."""

    kind: str
    head: str | None

    def check(self, run: RunContext) -> None:
        """Refuse settings this task cannot run, before any work (raise ``ConfigError``)."""

    def load_data(self, run: RunContext) -> TaskData:
        """Read the splits (before the model, so bad data fails fast)."""

    def load_model(self, run: RunContext) -> tuple[torch.nn.Module, Any]:
        """``(model, processor)`` on the CPU, gradient checkpointing applied if configured."""

    def collators(self, run: RunContext) -> tuple[Callable[[list], dict], Callable[[list], dict]]:
        """``(train_collate, eval_collate)``: items -> a batch dict."""

    def batch_count(self, batch: dict) -> int:
        """The loss normaliser's share of one micro-batch (target tokens, examples, ...)."""

    def batch_loss(self, run: RunContext, forward: Callable[..., Any], batch: dict) -> torch.Tensor:
        """The SUM of the per-item losses of one micro-batch (the loop divides by the global count)."""

    def evaluate(self, run: RunContext, phase: str) -> EvalResult | None:
        """Score the evaluation split with the current model; None on processes that do not record."""

    def method_label(self, cfg: dict, phase: str) -> str:
        """The result table's row label of ``phase``."""

    def report_title(self, cfg: dict) -> str:
        """The heading of ``results.md``."""


def method_label(cfg: dict, phase: str) -> str:
    """The usual row label: zero-shot, Prefix (after stage 1), then LoRA / PT-LoRA and so on."""
    names = {"lora": "LoRA", "adapter": "Adapter", "full": "Full FT"}
    if phase == "zero_shot":
        return "zero-shot"
    if phase == "eval_stage1":
        return "Prefix"
    m = names[cfg["stage2"]["method"]]
    return f"PT-{m}" if cfg["stage1"]["enabled"] else m
