"""The stage loop: the plan of a stage (checked before any work), the optimizer and schedule,
the steps with gradient accumulation, the non-finite guard, progress, Ctrl-C and mid-stage saves.

Determinism: the data order of every epoch is a permutation drawn from a generator seeded with
(seed, stage, epoch), and the mid-stage state stores the step, optimizer, scheduler and RNG
states, so a resumed run takes exactly the steps an uninterrupted one would. The loss is the sum
of the item losses over the whole global batch divided by its count (all-reduced), so one
process and N DDP processes with the same global batch compute the same gradient.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..checkpoint import full_value
from .config import ConfigError
from .distributed import all_reduce
from .fsdp import load_optimizer_state
from .run_folder import forget_train_records
from .run_state import load_state, save_state
from .task import RunContext, Task

__all__ = ["NonFinite", "Interrupted", "StagePlan", "plan_stage", "stage_mode", "lr_lambda", "epoch_order",
           "train_stage", "validation_loss", "accumulate", "CtrlC", "TrainingRun"]


class NonFinite(Exception):
    """A stage met a non-finite loss or gradient; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C); a resumable checkpoint was written."""


def stage_mode(cfg: dict, stage: str) -> str:
    """What trains in ``stage``: ``prefix`` (stage 1), ``peft`` or ``full`` (stage 2)."""
    if stage == "stage1":
        return "prefix"
    return "full" if cfg["stage2"]["method"] == "full" else "peft"


@dataclass(frozen=True)
class StagePlan:
    """The batch arithmetic of one stage: ``batch`` samples per step, split into ``accum``
    micro-batches of ``micro`` samples on each of ``world`` processes; ``total`` steps."""

    stage: str
    batch: int
    accum: int
    world: int
    micro: int
    n: int
    steps_per_epoch: int
    total: int
    warmup: int


def plan_stage(cfg: dict, stage: str, n: int, world: int) -> StagePlan:
    """The plan of ``stage`` for ``n`` training samples, or a ``ConfigError`` naming the setting."""
    sc = cfg[stage]
    G, accum = sc["batch_size"], sc["grad_accum"]
    if G % (accum * world):
        raise ConfigError(f"{stage}.batch_size={G} must be divisible by grad_accum×processes={accum}×{world}")
    spe = n // G
    if spe == 0:
        raise ConfigError(f"{stage}.batch_size={G} is larger than the training set ({n} samples)")
    total = sc["max_steps"] or sc["epochs"] * spe
    return StagePlan(stage, G, accum, world, G // (accum * world), n, spe, total,
                     int(round(sc["warmup_ratio"] * total)))


def lr_lambda(plan: StagePlan, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak (a ``LambdaLR`` factor)."""
    warm, total = plan.warmup, plan.total

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        prog = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return factor


def epoch_order(seed: int, stage: str, epoch: int, n: int) -> torch.Tensor:
    """The sample order of one epoch (depends on nothing but the seed, stage and epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + (7919 if stage == "stage2" else 0) + epoch)
    return torch.randperm(n, generator=g)


class TrainingRun(RunContext, Protocol):
    """What the loop uses of the run beyond :class:`~.task.RunContext`."""

    task: Task
    resume: bool
    # items -> a batch; with train.packing, -> its packed rows (one forward each)
    train_collate: Callable[[list], "dict | list[dict]"]
    autocast_dtype: torch.dtype | None
    steps_this_process: int

    def event(self, rec: dict) -> None: ...


class CtrlC:
    """While active, the first Ctrl-C asks the loop to save and stop after the current step; a
    second one aborts at once (the last checkpoint stays valid). Handlers can only be installed
    from the main thread; elsewhere Ctrl-C keeps its usual meaning."""

    def __init__(self, announce: bool):
        self.requested = False
        self.announce = announce
        self.previous = None

    def __enter__(self) -> CtrlC:
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle)
        else:
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nCtrl-C: writing a resumable checkpoint after this step (press again to abort)", flush=True)


def train_stage(run: TrainingRun, plan: StagePlan, named: list[tuple[str, torch.nn.Parameter]],
                param_groups: list[dict], trainable_count: int) -> float:
    """Train ``plan.stage`` to its end (continuing a saved mid-stage state when resuming); returns
    the last step's loss. Raises :class:`Interrupted` after saving on request and
    :class:`NonFinite` before applying a non-finite step."""
    stage, cfg, di = plan.stage, run.cfg, run.di
    sc = cfg[stage]
    opt = torch.optim.AdamW(param_groups, lr=sc["lr"], weight_decay=sc["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(plan, sc["min_lr_ratio"]))
    scaler = torch.amp.GradScaler("cuda") if run.autocast_dtype == torch.float16 else None
    start = 0
    st = load_state(run.out, stage, run.model, run.fsdp, run.log) if run.resume else None
    if st is not None:
        if run.fsdp:
            load_optimizer_state(run.model, opt, st["optimizer"])
        else:
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler and st["scaler"]:
            scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng_torch"])
        random.setstate(st["rng_python"])
        start = st["step"]
    if run.resume and di.main:
        forget_train_records(run.out, stage, after_step=start)
    fwd = run.model
    if di.world > 1 and not run.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg["train"]["compile"]:
        # one graph per stage (the stage changes which parameters need gradients); the patched
        # ops add no graph break (tests/test_compile.py). Traced afresh per stage: torch 2.11
        # reused stage 1's graph in stage 2 (its guards missed the requires_grad change, so the
        # LoRA factors got no gradient and stage 2's losses drifted from eager)
        torch._dynamo.reset()
        fwd = torch.compile(fwd, backend=cfg["train"]["compile_backend"])
    run.log(f"{stage} ({stage_mode(cfg, stage)}): {trainable_count:,} trainable parameters, {plan.total} steps "
            f"× {plan.batch} samples ({plan.n} train samples, {di.world} process(es))")
    bar = None
    if di.main and cfg["train"]["progress"]:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total, initial=start, desc=stage, dynamic_ncols=True, leave=False)

    def save(step: int) -> None:
        save_state(run.out, stage, step, run.model, opt, sched, scaler, fsdp=run.fsdp, di=di)

    stop_after = cfg["train"]["interrupt_after_steps"]
    save_every = cfg["output"]["save_every_steps"]
    max_norm = cfg["train"]["max_grad_norm"] or float("inf")
    t_last, samples_since = time.time(), 0
    loss_val = float("nan")
    with CtrlC(announce=di.main) as ctrl_c:
        try:
            for step in range(start, plan.total):
                loss_total = accumulate(run, fwd, plan, step, scaler)
                if scaler:
                    scaler.unscale_(opt)
                grad_norm = full_value(torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm))
                # fp16's loss scaler skips non-finite steps by design; elsewhere they mean divergence
                bad = not bool(torch.isfinite(loss_total)) or (scaler is None and not bool(torch.isfinite(grad_norm)))
                if bool(all_reduce(torch.tensor(float(bad)), di, "max")):
                    what = "loss" if not bool(torch.isfinite(loss_total)) else "gradient norm"
                    raise NonFinite(
                        f"{stage}: non-finite {what} at step {step + 1}/{plan.total}; the stage stopped before "
                        f"applying it, and the last good checkpoint is kept in {run.out}. Try a lower learning rate "
                        f"({stage}.lr={sc['lr']:g}) or full precision (train.precision=fp32)")
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                lr = opt.param_groups[0]["lr"]
                sched.step()
                opt.zero_grad(set_to_none=True)
                run.steps_this_process += 1
                loss_val = float(all_reduce(loss_total, di)) / di.world
                samples_since += plan.batch
                if bar is not None:
                    dt = max(1e-9, time.time() - t_last)
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", sps=f"{samples_since / dt:.0f}")
                    bar.update(1)
                if (step + 1) % cfg["train"]["log_every"] == 0 or step == start or step + 1 == plan.total:
                    run.event({"event": "train", "stage": stage, "step": step + 1, "loss": loss_val, "lr": lr})
                    t_last, samples_since = time.time(), 0
                stop = ctrl_c.requested or (stop_after is not None and run.steps_this_process >= stop_after)
                stop = bool(all_reduce(torch.tensor(float(stop)), di, "max"))
                if stop and step + 1 < plan.total:
                    save(step + 1)
                    raise Interrupted(f"interrupted in {stage} at step {step + 1}/{plan.total}; "
                                      f"resume with: python -m ptpeft_fast.train --resume {run.out}")
                if save_every and (step + 1) % save_every == 0 and step + 1 < plan.total:
                    save(step + 1)
                val_every = cfg["eval"]["val_every"]
                if run.data.val is not None and val_every and ((step + 1) % val_every == 0 or step + 1 == plan.total):
                    run.event({"event": "val", "stage": stage, "step": step + 1,
                               "loss": validation_loss(run, fwd, plan)})
        finally:
            if bar is not None:
                bar.close()
    return loss_val


@torch.no_grad()
def validation_loss(run: TrainingRun, fwd, plan: StagePlan) -> float:
    """Mean target-token loss over the validation items (``run.data.val``), dropout off; every
    process computes all of it, so nothing is gathered. Draws no random numbers, so the training
    that follows is the same with or without it."""
    was = run.model.training
    run.model.train(False)
    try:
        total, count = 0.0, 0
        for s in range(0, len(run.data.val), plan.micro):
            out = run.train_collate([run.data.val[i] for i in range(s, min(s + plan.micro, len(run.data.val)))])
            for b in out if isinstance(out, list) else [out]:
                total += float(run.task.batch_loss(run, fwd, b))
                count += run.task.batch_count(b)
    finally:
        run.model.train(was)
    return total / max(count, 1)


def accumulate(run: TrainingRun, fwd, plan: StagePlan, step: int, scaler) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (this process's share of the global
    batch); returns the step's loss (this process's part of the global mean)."""
    di = run.di
    epoch, pos = divmod(step, plan.steps_per_epoch)
    order = epoch_order(int(run.cfg["train"]["seed"]), plan.stage, epoch, plan.n)
    gidx = order[pos * plan.batch:(pos + 1) * plan.batch].tolist()
    batches = []
    for a in range(plan.accum):
        lo = a * plan.micro * plan.world + di.rank * plan.micro
        batch = run.train_collate([run.data.train[i] for i in gidx[lo:lo + plan.micro]])
        batches += batch if isinstance(batch, list) else [batch]
    count = torch.tensor(float(sum(run.task.batch_count(b) for b in batches)))
    count = all_reduce(count, di).clamp_min(1.0)
    loss_total = torch.zeros(())
    for a, b in enumerate(batches):
        last = a == len(batches) - 1  # packed: a micro-batch may be several rows
        if run.fsdp:
            run.model.set_requires_gradient_sync(last)  # reduce-scatter once per step
        sync = contextlib.nullcontext() if (plan.world == 1 or last or run.fsdp) else fwd.no_sync()
        with sync:
            loss = run.task.batch_loss(run, fwd, b) / count.to(run.device) * plan.world
            (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss.detach().cpu()
    return loss_total

