"""What a run saves and restores: the checkpoint at the end of each stage, the mid-stage trainer
state (for ``--resume``), and the training records a resumed stage will log again.

Every folder is written atomically with a checksum list (:mod:`.checkpointing`); nothing here is
a pickle, since a run folder may come from anyone.
"""
from __future__ import annotations

import json
import os
import random

import torch

from ..atomic_files import atomic_write_text
from ..checkpoint import load, ptpeft_state_dict, save
from .checkpointing import (
    STATE_FORMAT,
    DamagedState,
    atomic_dir,
    complete_dir,
    folder_copies,
    folder_damage,
    read_state,
    read_tensors,
)
from .config import ConfigError
from .distributed import DistInfo, barrier
from .fsdp import gather_named, load_full, optimizer_state

__all__ = ["STATE", "save_stage_checkpoint", "load_stage_checkpoint", "save_state", "load_state",
           "forget_train_records", "trainable"]

STATE = "state"  # the mid-stage state folder inside the output folder
FULL_MODEL = "full_model.safetensors"  # base weights that a stage changed (ptpeft_fast.save leaves them out)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that require gradients, with their names."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_stage_checkpoint(out: str, stage: str, model: torch.nn.Module, *, patched: bool, full: bool,
                          main: bool, fsdp: bool) -> None:
    """``out/checkpoints/<stage>``: the PT-PEFT tensors (``ptpeft_fast.save``) of a patched model,
    and in ``full_model.safetensors`` the base weights: all of them after full fine-tuning
    (``full``), the trained ones (a head) of an unpatched model. Under FSDP every process takes
    part in the gathers and the main one writes."""
    if not (main or fsdp):
        return
    tensors = ptpeft_state_dict(model) if patched else None
    named = list(model.named_parameters()) if full else (trainable(model) if not patched else None)
    base = gather_named(named, keep=main) if named is not None else None
    if not main:
        return
    path = os.path.join(out, "checkpoints", stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(tmp: str) -> None:
        if patched:
            save(model, tmp, tensors=tensors)
        if base is not None:
            from safetensors.torch import save_file
            save_file(base, os.path.join(tmp, FULL_MODEL))
    atomic_dir(path, write)


def load_stage_checkpoint(out: str, stage: str, model: torch.nn.Module, patched: bool) -> str:
    """Restore what :func:`save_stage_checkpoint` wrote; returns the folder it was read from."""
    final = os.path.join(out, "checkpoints", stage)
    path = complete_dir(final)
    if path is None:
        copies = folder_copies(final)
        what = folder_damage(copies[0]) if copies else f"{final} is missing"
        raise DamagedState(f"{out}: {stage} is marked done but {what}: restore it, or start the run again "
                           "in a new output folder")
    if patched and os.path.exists(os.path.join(path, "ptpeft_config.json")):
        load(model, path, stage=None)  # the run sets each phase's stage itself
    full = os.path.join(path, FULL_MODEL)
    if os.path.exists(full):
        sd = read_tensors(full)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in sd.items():
                params[n].copy_(t)
    return path


def save_state(out: str, stage: str, step: int, model: torch.nn.Module, opt, sched, scaler, *, fsdp: bool,
               di: DistInfo) -> None:
    """Mid-stage state: trainable tensors, optimizer, scheduler, loss scaler, RNG, position.

    Safetensors and JSON only; the copy it replaces stays as ``state.prev``, the fallback if this
    one is later found damaged."""
    main = di.main
    if fsdp:  # gathered whole on the main process (collectives: every process)
        params = gather_named(trainable(model), keep=main)
        optim = optimizer_state(model, opt)
    elif main:
        params = gather_named(trainable(model), keep=True)
        optim = opt.state_dict()
    if not main:
        barrier(di)
        return
    from safetensors.torch import save_file

    from ..state_files import encode
    tensors: dict[str, torch.Tensor] = {}
    body = encode({"optimizer": optim, "scheduler": sched.state_dict(),
                   "scaler": scaler.state_dict() if scaler else None,
                   "rng_torch": torch.get_rng_state(), "rng_python": random.getstate()}, tensors)

    def write(tmp: str) -> None:
        save_file(params, os.path.join(tmp, "trainable.safetensors"))
        save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
        atomic_write_text(os.path.join(tmp, "trainer.json"), json.dumps(
            {"format": STATE_FORMAT, "stage": stage, "step": step, "fsdp": fsdp, "state": body}))
    atomic_dir(os.path.join(out, STATE), write, keep_previous=True)
    barrier(di)


def load_state(out: str, stage: str, model: torch.nn.Module, fsdp: bool, log) -> dict | None:
    """The newest undamaged mid-stage state of ``stage``, its trainable tensors loaded into
    ``model`` (None: start the stage from step 0).

    A damaged newest copy falls back to the previous one, saying which file was damaged; with no
    usable copy the run stops (:class:`DamagedState`) naming the file and the fix."""
    final = os.path.join(out, STATE)
    problems = []
    for path in folder_copies(final):
        problem = folder_damage(path)
        if problem is None:
            try:
                st = read_state(path)
                sd = read_tensors(os.path.join(path, "trainable.safetensors"))
            except DamagedState as e:
                problem = str(e)
        if problem is not None:
            problems.append(problem)
            continue
        if st["stage"] != stage:
            return None
        if problems:
            log(f"warning: {problems[0]}; continuing {stage} from step {st['step']} with the previous state ({path})")
        break
    else:
        if problems:
            raise DamagedState(f"{problems[0]}: delete {final} (and {final}.prev) to restart {stage} from "
                               "its start, or restore the file")
        return None
    params = dict(trainable(model))
    if set(sd) != set(params):
        raise RuntimeError(f"{path}: the saved trainable parameters do not match this run's stage {stage}")
    if bool(st.get("fsdp")) != fsdp:
        raise ConfigError(f"{path} was written with train.strategy={'fsdp' if st.get('fsdp') else 'ddp'}; "
                          "resume with the same strategy")
    for n, t in sd.items():
        load_full(params[n], t)
    log(f"resumed: {stage} from step {st['step']} ({path})")
    return st


def forget_train_records(out: str, stage: str, after_step: int) -> None:
    """Drop ``stage``'s training records past ``after_step`` from ``metrics.jsonl``: a run killed
    after logging them resumes from an earlier state and logs those steps again."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def stale(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return rec.get("event") == "train" and rec.get("stage") == stage and int(rec.get("step", 0)) > after_step
    kept = [line for line in lines if not stale(line)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
