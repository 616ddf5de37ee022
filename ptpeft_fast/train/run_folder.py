"""The run folder of ``python -m ptpeft_fast.train``: every file name, its writer and its reader.

Nothing else in the package types one of these names. A run folder::

    <output>/
    ├── config.yaml               the resolved config (atomic); --resume reads it back
    ├── progress.json             {"done": [phase, ...]} (atomic): the phases --resume skips
    ├── metrics.jsonl             one JSON record per line, appended: "train" steps, "eval" results
    ├── predictions/<phase>.json  each evaluation's outputs (atomic)
    ├── results.md                the results table (atomic)
    ├── spectrum.png              the spectra of the evaluated methods
    ├── checkpoints/<stage>/      at the end of each stage (an atomic folder)
    │   ├── ptpeft.safetensors, ptpeft_config.json   the PT-PEFT tensors (ptpeft_fast.save)
    │   └── full_model.safetensors                   base weights the stage changed
    └── state/                    mid-stage state for --resume (an atomic folder; state.prev/ before it)
        ├── trainable.safetensors   the trainable tensors
        ├── trainer.safetensors     optimizer moments, torch RNG state
        └── trainer.json            stage, step, scheduler, scaler, Python RNG state (plain data)

A demo or an experiment writes ``config.yaml``, ``results.md`` and ``spectrum.png`` at the top and
one run folder per run below it (``<method>/``, or ``[pc<N>/][<variant>/]<method>/seed<S>/``).

An *atomic folder* is written beside its final name and renamed into place, and ends with a
``COMPLETE`` file that lists the SHA-256 of every file in it (checked before anything is read).
Everything is safetensors, JSON, YAML or text: nothing in a run folder is a pickle or is
executed (a folder may come from anyone).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from ..atomic_files import atomic_write_text

__all__ = ["CONFIG", "PROGRESS", "METRICS", "RESULTS", "PREDICTIONS", "SPECTRUM", "CHECKPOINTS", "STATE",
           "MANIFEST", "FULL_MODEL", "TRAINABLE", "STATE_FORMAT", "DamagedState", "is_run", "config_path",
           "write_config", "has_progress", "read_progress", "write_progress", "append_record", "read_records",
           "forget_train_records", "write_results", "write_predictions", "spectrum_path", "checkpoint_dir",
           "state_dir", "reset", "write_trainer_state", "read_trainer_state", "read_tensors"]

CONFIG = "config.yaml"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
RESULTS = "results.md"
PREDICTIONS = "predictions"
SPECTRUM = "spectrum.png"
CHECKPOINTS = "checkpoints"
STATE = "state"
MANIFEST = "COMPLETE"  # written last into an atomic folder: the SHA-256 of every file
FULL_MODEL = "full_model.safetensors"
TRAINABLE = "trainable.safetensors"
_TRAINER_TENSORS = "trainer.safetensors"
_TRAINER_META = "trainer.json"
_LEGACY_TRAINER = "trainer.pt"  # format 1 (a pickle; read with weights_only=True only)
STATE_FORMAT = 2  # 1: trainer.pt, 2: trainer.json + trainer.safetensors


class DamagedState(Exception):
    """A run folder's saved state cannot be used; the message names the file and the fix."""


# -- the run's own files ------------------------------------------------------------------------
def is_run(path: str) -> bool:
    """Whether ``path`` is a run folder (it holds the config a run writes first)."""
    return os.path.isfile(config_path(path))


def config_path(out: str) -> str:
    return os.path.join(out, CONFIG)


def write_config(out: str, text: str) -> None:
    atomic_write_text(config_path(out), text)


def has_progress(out: str) -> bool:
    """Whether a run has started in ``out`` (it records the phases it finished)."""
    return os.path.exists(os.path.join(out, PROGRESS))


def read_progress(out: str) -> list[str]:
    """The phases finished in ``out`` (none yet: empty)."""
    path = os.path.join(out, PROGRESS)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)["done"]


def write_progress(out: str, done: list[str]) -> None:
    atomic_write_text(os.path.join(out, PROGRESS), json.dumps({"done": done}))


def append_record(out: str, record: dict[str, Any]) -> None:
    """Append one record to ``metrics.jsonl``."""
    with open(os.path.join(out, METRICS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(out: str, event: str | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (those of one ``event`` kind), in order."""
    path = os.path.join(out, METRICS)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


def forget_train_records(out: str, stage: str, after_step: int) -> None:
    """Drop ``stage``'s training and validation records past ``after_step``: a run killed after logging them
    resumes from an earlier state and logs those steps again."""
    path = os.path.join(out, METRICS)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def stale(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return (rec.get("event") in ("train", "val") and rec.get("stage") == stage
                and int(rec.get("step", 0)) > after_step)
    kept = [line for line in lines if not stale(line)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def write_results(out: str, markdown: str) -> str:
    """Write ``results.md``; returns its path."""
    path = os.path.join(out, RESULTS)
    atomic_write_text(path, markdown)
    return path


def write_predictions(out: str, phase: str, text: str) -> None:
    """Write ``predictions/<phase>.json`` (``text``: the JSON the task made)."""
    os.makedirs(os.path.join(out, PREDICTIONS), exist_ok=True)
    atomic_write_text(os.path.join(out, PREDICTIONS, f"{phase}.json"), text)


def spectrum_path(out: str) -> str:
    return os.path.join(out, SPECTRUM)


def checkpoint_dir(out: str, stage: str) -> str:
    return os.path.join(out, CHECKPOINTS, stage)


def state_dir(out: str) -> str:
    return os.path.join(out, STATE)


def reset(out: str) -> None:
    """Remove what a run left in ``out`` (``output.overwrite``): progress, records, state, checkpoints."""
    for name in (PROGRESS, METRICS, STATE, CHECKPOINTS):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


# -- the mid-stage trainer state (inside an atomic folder) ---------------------------------------
def write_trainer_state(folder: str, trainable: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                        stage: str, step: int, fsdp: bool, body: Any) -> None:
    """The three files of a state folder: the trainable tensors, the trainer's tensors, and its
    plain-data part (``body``, encoded by :mod:`ptpeft_fast.state_files` against ``tensors``)."""
    from safetensors.torch import save_file

    save_file(trainable, os.path.join(folder, TRAINABLE))
    save_file(tensors, os.path.join(folder, _TRAINER_TENSORS))
    atomic_write_text(os.path.join(folder, _TRAINER_META), json.dumps(
        {"format": STATE_FORMAT, "stage": stage, "step": step, "fsdp": fsdp, "state": body}))


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or :class:`DamagedState` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise DamagedState(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def read_trainer_state(folder: str) -> dict[str, Any]:
    """The trainer state of one state folder; never unpickles anything but plain data."""
    from ..state_files import StateFormatError, decode
    meta_path = os.path.join(folder, _TRAINER_META)
    if not os.path.exists(meta_path):
        legacy = os.path.join(folder, _LEGACY_TRAINER)
        if not os.path.exists(legacy):
            raise DamagedState(f"{folder} holds no {_TRAINER_META}")
        import pickle
        try:  # written by an older ptpeft_fast: plain tensors and numbers, so weights_only suffices
            return torch.load(legacy, weights_only=True)
        except pickle.UnpicklingError:
            raise DamagedState(f"{legacy} holds objects other than tensors and numbers; it was not loaded, since "
                               "unpickling them could run code") from None
        except Exception as e:
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise DamagedState(f"{legacy} cannot be read ({type(e).__name__}: {first})") from None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.loads(f.read())
        tensors = read_tensors(os.path.join(folder, _TRAINER_TENSORS))
        state = decode(meta["state"], tensors)
        return {"stage": str(meta["stage"]), "step": int(meta["step"]), "fsdp": bool(meta.get("fsdp")), **state}
    except (OSError, ValueError, KeyError, TypeError, StateFormatError) as e:
        raise DamagedState(f"{folder}'s trainer state cannot be read ({type(e).__name__}: {e})") from None
