"""What a run saves and restores: the checkpoint at the end of each stage, the mid-stage trainer
state (for ``--resume``), and the training records a resumed stage will log again.

Every folder is written atomically with a checksum list (:mod:`.checkpointing`); the files and
their layout are :mod:`.run_folder`'s. Nothing here is a pickle, since a run folder may come from
anyone.
"""
from __future__ import annotations

import os
import random

import torch

from ..checkpoint import load, ptpeft_state_dict, save
from .checkpointing import atomic_dir, complete_dir, folder_copies, folder_damage
from .config import ConfigError
from .distributed import DistInfo, barrier
from .fsdp import gather_named, load_full, optimizer_state
from .run_folder import (
    FULL_MODEL,
    TRAINABLE,
    DamagedState,
    checkpoint_dir,
    read_tensors,
    read_trainer_state,
    state_dir,
    write_trainer_state,
)

__all__ = ["save_stage_checkpoint", "load_stage_checkpoint", "save_state", "load_state", "trainable"]


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
    path = checkpoint_dir(out, stage)
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
    final = checkpoint_dir(out, stage)
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
    from ..state_files import encode
    tensors: dict[str, torch.Tensor] = {}
    body = encode({"optimizer": optim, "scheduler": sched.state_dict(),
                   "scaler": scaler.state_dict() if scaler else None,
                   "rng_torch": torch.get_rng_state(), "rng_python": random.getstate()}, tensors)
    atomic_dir(state_dir(out), lambda tmp: write_trainer_state(tmp, params, tensors, stage, step, fsdp, body),
               keep_previous=True)
    barrier(di)


def load_state(out: str, stage: str, model: torch.nn.Module, fsdp: bool, log) -> dict | None:
    """The newest undamaged mid-stage state of ``stage``, its trainable tensors loaded into
    ``model`` (None: start the stage from step 0).

    A damaged newest copy falls back to the previous one, saying which file was damaged; with no
    usable copy the run stops (:class:`DamagedState`) naming the file and the fix."""
    final = state_dir(out)
    problems = []
    for path in folder_copies(final):
        problem = folder_damage(path)
        if problem is None:
            try:
                st = read_trainer_state(path)
                sd = read_tensors(os.path.join(path, TRAINABLE))
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
