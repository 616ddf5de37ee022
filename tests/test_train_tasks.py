"""Every task implements the whole ``Task`` protocol, and ``tasks.task_for`` picks the task a
config names (the runner calls only protocol members, so a missing one would fail mid-run)."""
from __future__ import annotations

import inspect

import pytest

from ptpeft_fast.train.classification import ClassificationTask
from ptpeft_fast.train.config import load_config
from ptpeft_fast.train.generation import GenerationTask
from ptpeft_fast.train.task import Task
from ptpeft_fast.train.tasks import task_for

MEMBERS = [n for n in vars(Task) if not n.startswith("_")]
ATTRIBUTES = list(Task.__annotations__)


@pytest.mark.parametrize("task", [GenerationTask("vqa"), ClassificationTask()], ids=["generation", "classification"])
def test_task_implements_every_protocol_member(task):
    assert set(ATTRIBUTES) == {"kind", "head"}
    for name in ATTRIBUTES:
        assert hasattr(task, name), name
    for name in MEMBERS:
        impl = getattr(type(task), name, None)
        assert callable(impl), f"{type(task).__name__} lacks {name}"
        want = list(inspect.signature(getattr(Task, name)).parameters)
        got = list(inspect.signature(impl).parameters)
        assert got == want, f"{type(task).__name__}.{name}{got} differs from Task.{name}{want}"


@pytest.mark.parametrize("kind,cls,head", [("vqa", GenerationTask, None), ("caption", GenerationTask, None),
                                           ("classification", ClassificationTask, "classifier")])
def test_task_for_picks_the_configured_task(kind, cls, head):
    fmt = ["data.format=stdlib-docstrings"] if kind == "classification" else []
    task = task_for(load_config(None, [f"data.task={kind}", *fmt]))
    assert type(task) is cls and task.kind == kind and task.head == head
