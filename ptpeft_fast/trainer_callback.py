"""``StageCallback``: one Hugging Face ``Trainer`` for both PT-PEFT stages.

The ``Trainer`` builds its optimizer during the first ``train()`` call, from the parameters that
require grad at that moment, and keeps it for every later ``train()`` call (the learning-rate
schedule is rebuilt per call). Reused after ``set_stage(model, "peft")`` it would go on stepping
the stage-1 parameters only. This callback gives a ``train()`` call that starts in a new stage a
fresh optimizer and schedule, built as the ``Trainer`` builds them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, get_scheduler

__all__ = ["StageCallback"]


class StageCallback(TrainerCallback):
    """Rebuild the ``Trainer``'s optimizer and schedule when ``set_stage`` changed what trains.

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[pf.StageCallback()])
        pf.set_stage(model, "prefix"); trainer.train()   # stage 1: the prefix
        pf.set_stage(model, "peft");   trainer.train()   # stage 2: LoRA (and the prefix) with a fresh AdamW

    At the start of each ``train()`` call, when the parameters that require grad are not exactly
    those the optimizer holds, a new optimizer is built the way ``Trainer.create_optimizer`` builds
    it (``TrainingArguments.optim`` and its arguments, weight decay except on biases and norms; its
    state starts empty, as in a new ``Trainer``), and a new schedule for this call's steps. The
    callback API hands over the optimizer and schedule objects that the ``Trainer`` and
    ``accelerate`` hold, not the ``Trainer``, so the new ones take the place of the old inside those
    objects. An optimizer passed in by the user (``Trainer(optimizers=...)``,
    ``optimizer_cls_and_kwargs``) of another class than ``TrainingArguments.optim`` builds, or one
    that is not a ``torch.optim.Optimizer`` (DeepSpeed), is refused with the fix: a new ``Trainer``
    per stage.
    """

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs) -> None:
        if model is None or optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        model = getattr(model, "module", model)  # DDP
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        held = {id(p) for group in getattr(inner, "param_groups", []) for p in group["params"]}
        if held == {id(p) for _, p in named}:
            return
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"StageCallback: the Trainer's optimizer is a {type(inner).__name__}, not a torch "
                            "optimizer, so it cannot be rebuilt for the new stage; build a new Trainer per stage")
        cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if type(inner) is not cls or any(k in opt_kwargs for k in ("params", "model", "optimizer_dict")):
            raise TypeError(f"StageCallback: the Trainer's optimizer is a {type(inner).__name__}, which "
                            f"TrainingArguments.optim={args.optim!r} does not build (it was passed in, or the "
                            "optimizer builds its own groups), so it cannot be rebuilt for the new stage; build a new "
                            "Trainer (and optimizer) per stage")
        # the method reads nothing of the Trainer: the same split as Trainer.create_optimizer
        decay = set(Trainer.get_decay_parameter_names(None, model))
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        fresh = cls(groups, **opt_kwargs)
        schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler

        def new_schedule(opt: torch.optim.Optimizer) -> Any:
            return get_scheduler(args.lr_scheduler_type, optimizer=opt,
                                 num_warmup_steps=args.get_warmup_steps(state.max_steps),
                                 num_training_steps=state.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)

        if schedule is not None and type(new_schedule(cls(groups, **opt_kwargs))) is not type(schedule):
            raise TypeError(f"StageCallback: the Trainer's schedule is a {type(schedule).__name__}, which "
                            f"TrainingArguments.lr_scheduler_type={args.lr_scheduler_type!r} does not build (it was "
                            "passed in), so it cannot be rebuilt for the new stage; build a new Trainer per stage")
        _take_place(inner, fresh)
        if schedule is not None:
            _take_place(schedule, new_schedule(inner))


def _take_place(old: object, new: object) -> None:
    """Make ``old`` (an object others hold) the ``new`` one of the same class."""
    vars(old).clear()
    vars(old).update(vars(new))
