"""Which :class:`~.task.Task` a config asks for (``data.task``), and the run that performs it."""
from __future__ import annotations

from typing import Callable

from .classification import ClassificationTask
from .generation import GenerationTask
from .pretrain import ensure_tiny_pretrained
from .runner import Run
from .task import Task

__all__ = ["task_for", "make_run"]


def task_for(cfg: dict) -> Task:
    """The task of ``cfg['data']['task']``: ``classification``, or ``caption`` / ``vqa`` (generation)."""
    kind = cfg["data"]["task"]
    if kind == "classification":
        return ClassificationTask()
    return GenerationTask(kind, pretrained=ensure_tiny_pretrained)


def make_run(cfg: dict, out_dir: str, resume: bool = False, log: Callable[[str], None] | None = None) -> Run:
    """A :class:`~.runner.Run` of ``cfg``'s task writing to ``out_dir``."""
    return Run(cfg, out_dir, task_for(cfg), resume=resume, log=log)
