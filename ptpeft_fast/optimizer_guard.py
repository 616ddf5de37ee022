"""Stop an optimizer that missed a stage change.

An optimizer holds the parameters that required grad when it was built. One kept from stage 1
after ``set_stage(model, "peft")`` steps the prefix only: the loss still falls, and not one LoRA
factor changes (seen with one Hugging Face ``Trainer`` reused for both stages: 0 of 120
``lora_B`` tensors moved). ``patch`` therefore registers one global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) that, after each stage change,
checks once that every parameter the stage trains is held by an optimizer that steps, and raises
:class:`StaleOptimizerError` naming the fix when it is not.

The check is deferred by one step: a parameter is missing only if no optimizer that stepped since
the stage change holds it, so a deliberate split over two optimizers (say prefix and LoRA) passes
once both have stepped; the error comes at the second step of an optimizer that is still short.
After the check the hook costs one dictionary lookup per patched model and step.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["StaleOptimizerError", "watch", "unwatch"]

_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# optimizer -> {id(patch state): (stage version, "ok" | "other" | "pending")}
_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (stage version, optimizers that stepped holding its parameters since that stage began)
_stepping: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_handle: list = []


class StaleOptimizerError(RuntimeError):
    """An optimizer step after ``set_stage`` that leaves parameters of the new stage untrained."""


def watch(model: nn.Module) -> None:
    """Check the optimizers that step ``model``'s parameters after each of its stage changes."""
    if not _handle:
        _handle.append(register_optimizer_step_pre_hook(_before_step))
    _models.add(model)


def unwatch(model: nn.Module) -> None:
    """Stop checking ``model`` (``unpatch``)."""
    _models.discard(model)
    _stepping.pop(model, None)


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@torch.compiler.disable
def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for model in list(_models):
        state = model.__dict__.get("_ptpeft")
        if state is None or state.stage in (None, "eval"):
            continue
        record = _seen.setdefault(optimizer, {})
        status = record.get(id(state))
        if status is not None and status[0] == state.stage_version and status[1] != "pending":
            continue
        held = _held(optimizer)
        named = list(model.named_parameters())
        if not any(id(p) in held for _, p in named):
            record[id(state)] = (state.stage_version, "other")
            continue
        version, steppers = _stepping.get(model, (None, None))
        if version != state.stage_version:  # optimizers of an earlier stage do not count
            steppers = weakref.WeakSet()
            _stepping[model] = (state.stage_version, steppers)
        steppers.add(optimizer)
        covered = set().union(*(_held(o) for o in steppers))
        missing = [n for n, p in named if p.requires_grad and id(p) not in covered]
        if not missing:
            record[id(state)] = (state.stage_version, "ok")
        elif status == (state.stage_version, "pending"):
            raise StaleOptimizerError(_message(state.stage, missing, len([p for _, p in named if p.requires_grad])))
        else:
            record[id(state)] = (state.stage_version, "pending")


def _message(stage: str, missing: list[str], trainable: int) -> str:
    return (f"optimizer step in stage {stage!r}: {len(missing)} of the {trainable} parameters this stage trains are in "
            f"no optimizer (e.g. {missing[0]}); the optimizer was built before set_stage(model, {stage!r}) from the "
            "parameters that required grad then, so they would never change. Build the optimizer after set_stage "
            "(Hugging Face Trainer: a new Trainer per stage, or Trainer(..., callbacks=[ptpeft_fast.StageCallback()]), "
            "which rebuilds it when the stage changed)")
