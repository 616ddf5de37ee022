"""One training run: zero-shot evaluation, stage 1 (prefix), stage 2 (LoRA / Adapter / full), an
evaluation after each stage, checkpoints, resume and the report, for any :class:`~.task.Task`.

The jobs live in their own modules: the stage loop (:mod:`.loop`), what is saved and restored
(:mod:`.run_state`), evaluation and the report (:mod:`.evaluation`), processes (:mod:`.distributed`,
:mod:`.fsdp`). This module decides the order of the phases and what is patched and trained.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from typing import Callable

import torch

from ..atomic_files import remove_stale_temporaries
from ..checkpoint import load_prefix
from ..config import PTPeftConfig
from ..disable import disabled
from ..models import has_image_input
from ..packing import packing_refusal
from ..patching import patch
from ..stages import mark_trainable, set_stage, trainable_parameters
from . import run_folder
from .checkpointing import complete_dir, folder_copies
from .config import ConfigError, dump_config, peft_config_dict
from .distributed import barrier, init_distributed
from .evaluation import eval_rows, record_eval, set_eval, write_report
from .fsdp import shard
from .loop import StagePlan, plan_stage, stage_mode, train_stage
from .packed_batches import PackingCollator, batches_note
from .run_state import load_stage_checkpoint, save_stage_checkpoint, trainable
from .task import Task, TaskData

__all__ = ["Run"]



class Run:
    """A configured run of ``task`` writing to ``out_dir``. ``execute()`` does every phase not yet
    recorded as done in the run folder and returns the result rows. The settings are checked when it
    is made (device, precision, strategy) and before the first phase (the task's own, every
    stage's batch arithmetic), so a bad config fails before any training."""

    def __init__(self, cfg: dict, out_dir: str, task: Task, resume: bool = False,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = out_dir
        self.task = task
        self.resume = resume
        tc = cfg["train"]
        dev = tc["device"]
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        elif torch.device(dev).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device={dev}, but this torch sees no CUDA device "
                              f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                              "use train.device=cpu or auto")
        self.di = init_distributed(torch.device(dev).type)
        if torch.device(dev).type == "cuda" and self.di.world > 1:
            dev = f"cuda:{self.di.local_rank}"
        self.device = torch.device(dev)
        self._log = log or print
        self.steps_this_process = 0
        nt = tc["num_threads"] or (max(1, (os.cpu_count() or 1) // self.di.world) if self.di.world > 1 else 0)
        if nt:
            torch.set_num_threads(nt)
        self.fsdp = tc["strategy"] == "fsdp"
        if self.fsdp and self.di.world == 1:
            raise ConfigError("train.strategy=fsdp shards the model across processes: launch with "
                              "torchrun --nproc_per_node N (N >= 2), or use train.strategy=ddp for one process")
        self.autocast_dtype = self._autocast_dtype(tc["precision"])
        task.check(self)
        self.patched = False
        self.trainable_counts: dict[str, int] = {}
        self.plans: dict[str, StagePlan] = {}
        # a finished run whose stage 1 this one takes instead of training its own (an experiment sets
        # it when that run had the same model, data, stage-1 and train settings)
        self.stage1_from: str | None = None
        # False: train only, no evaluation phase (a learning-rate sweep reads the validation loss)
        self.evaluate_after = True

    # -- what tasks and the loop use -----------------------------------------------------------
    def log(self, msg: str) -> None:
        """Print ``msg`` (main process only)."""
        if self.di.main:
            self._log(msg)

    def event(self, rec: dict) -> None:
        """Append ``rec`` to the run's records (main process only)."""
        if self.di.main:
            run_folder.append_record(self.out, rec)

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32":
            return None
        if precision == "auto":
            if self.device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return None  # CPU: fp32 (bf16 autocast on CPU is slower than fp32 without AMX)
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision as configured (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def seed(self, offset: int = 0) -> None:
        """Seed Python, torch and numpy with ``train.seed + offset``."""
        s = int(self.cfg["train"]["seed"]) + offset
        random.seed(s)
        torch.manual_seed(s)
        try:
            import numpy as np
            np.random.seed(s % 2**32)
        except ImportError:
            pass

    def model_inputs(self, batch: dict) -> dict:
        """A batch's model inputs on the run's device (floating tensors in the model's dtype)."""
        out = {}
        for k, v in batch.items():
            if k in ("labels", "record_ids"):
                continue
            if torch.is_tensor(v):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.model.dtype)
            out[k] = v
        return out

    @property
    def train_ds(self):
        """The training items (None when no stage trains)."""
        return self.data.train

    # -- setup ---------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Read the splits and plan every stage (before the model: bad data and settings fail fast)."""
        self.data: TaskData = self.task.load_data(self)
        for stage in ("stage1", "stage2"):
            if self.cfg[stage]["enabled"]:
                self.plans[stage] = plan_stage(self.cfg, stage, len(self.data.train), self.di.world)

    def load_model(self) -> None:
        """The task's model (on the device; under FSDP it stays on the CPU until sharded)."""
        model, self.processor = self.task.load_model(self)
        # a quantized model was loaded onto the device (transformers refuses .to() for some kinds)
        self.model = model if self.fsdp or getattr(model, "is_quantized", False) else model.to(self.device)

    def make_collators(self) -> None:
        self.train_collate, self.eval_collate = self.task.collators(self)
        self.target_collate = self.train_collate  # one row per item, whatever train.packing says
        tc = self.cfg["train"]
        if tc["packing"]:
            reason = packing_refusal(self.model) or ("its inputs carry images" if has_image_input(self.processor)
                                                     else None)
            if reason is not None:
                raise ConfigError(f"train.packing=true: model.name={self.cfg['model']['name']!r} cannot take a packed "
                                  f"batch ({reason}); set train.packing=false")
            self.train_collate = PackingCollator(self.train_collate, tc["max_tokens"])

    def patch(self) -> None:
        """Add the configured PT-PEFT modules (a plain full fine-tune or a linear probe adds none)."""
        d = peft_config_dict(self.cfg)
        if d is None:
            return
        self.seed(1)  # the PT-PEFT initialisation does not depend on what ran before
        patch(self.model, PTPeftConfig.from_dict(d))
        if self.task.head:
            mark_trainable(self.model, self.task.head)
        self.patched = True

    # -- progress ------------------------------------------------------------------------------
    def _mark_done(self, phase: str) -> None:
        if self.di.main:
            run_folder.write_progress(self.out, run_folder.read_progress(self.out) + [phase])
        barrier(self.di)

    def phases(self) -> list[str]:
        """The phases of this run, in order."""
        c = self.cfg
        stages = [s for s in ("stage1", "stage2") if c[s]["enabled"]]
        evaluate = self.evaluate_after
        ph = ["zero_shot"] if c["eval"]["zero_shot"] and evaluate else []
        for s in stages:
            ph.append(s)
            if evaluate and (c["eval"]["after_each_stage"] or s == stages[-1]):
                ph.append(f"eval_{s}")
        if not ph:
            raise ConfigError("nothing to do: eval.zero_shot is false and both stage1.enabled and "
                              "stage2.enabled are false")
        return ph

    # -- main entry ----------------------------------------------------------------------------
    def execute(self) -> list[dict]:
        """Run (or continue) every phase; returns the evaluation rows."""
        os.makedirs(self.out, exist_ok=True) if self.di.main else None
        barrier(self.di)
        if self.di.main:
            stale = remove_stale_temporaries(self.out)
            if stale:
                self.log(f"removed {len(stale)} half-written file(s) of an earlier killed run "
                         f"(e.g. {os.path.relpath(stale[0], self.out)}); the complete copies are kept")
            run_folder.write_config(self.out, dump_config(self.cfg))
        phases = self.phases()
        self.seed(0)
        self.load_data()
        self.load_model()
        self.make_collators()
        done = run_folder.read_progress(self.out) if self.resume else []
        t0 = time.time()
        patched_yet = False
        if self.fsdp:
            # patch and restore finished stages before sharding; zero-shot then runs with the
            # PT-PEFT modules bypassed (pf.disabled), which computes the unpatched model
            self.patch()
            patched_yet = True
            for ph in phases:
                if ph in done and ph in ("stage1", "stage2"):
                    self._restore_stage(ph)
            name = type(self.model).__name__  # before fully_shard renames the class (FSDP<name>)
            units = shard(self.model, self.device, self.di.world)
            self.log(f"fsdp: {units} units ({name} blocks + root) sharded over {self.di.world} processes")
        for ph in phases:
            if ph != "zero_shot" and not patched_yet:
                self.patch()
                patched_yet = True
            if ph in done:
                if ph in ("stage1", "stage2") and not self.fsdp:
                    self._restore_stage(ph)
                continue
            if ph == "zero_shot":
                with disabled(self.model) if self.patched else contextlib.nullcontext():
                    self.evaluate(ph)
            elif ph.startswith("eval_"):
                self.evaluate(ph)
            elif ph == "stage1" and self.stage1_from is not None and not self.fsdp:
                self.adopt_stage1(self.stage1_from)
            else:
                self.train_stage(ph)
            self._mark_done(ph)
        rows = eval_rows(self.out, phases)
        if self.di.main:
            write_report(self.out, rows, self.task.kind, self.cfg["eval"]["tau"],
                         title=self.task.report_title(self.cfg), notes=(batches_note(self.cfg),))
            self.log(f"done in {time.time() - t0:.0f}s; results: {os.path.join(self.out, run_folder.RESULTS)}")
        barrier(self.di)
        return rows

    # -- stages --------------------------------------------------------------------------------
    def _restore_stage(self, stage: str) -> None:
        if self.patched and not self.fsdp:  # the trainable count the result row reports, as if run now
            self._set_trainable(stage)
        path = load_stage_checkpoint(self.out, stage, self.model, self.patched)
        self.log(f"resumed: {stage} loaded from {path}")

    def _set_trainable(self, stage: str) -> None:
        """requires_grad for ``stage``: the stage's PT-PEFT parameters when patched; unpatched, the
        whole model (full fine-tune) or only the task's head (``stage2.method: head``)."""
        if self.patched:
            set_stage(self.model, stage_mode(self.cfg, stage))
            self.trainable_counts[stage] = trainable_parameters(self.model)["total"]
            return
        head, head_only = self.task.head, self.cfg["stage2"]["method"] == "head"
        for n, p in self.model.named_parameters():
            p.requires_grad_(not head_only or (head is not None and (n == head or n.startswith(head + "."))))
        self.model.train()
        self.trainable_counts[stage] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _param_groups(self, stage: str, named: list) -> list[dict]:
        """One group at ``stageN.lr``; the task's head at ``stageN.head_lr`` when that is set."""
        head, hl = self.task.head, self.cfg[stage].get("head_lr")
        if head is None or hl is None:
            return [{"params": [p for _, p in named]}]
        is_head = [n == head or n.startswith(head + ".") for n, _ in named]
        body = [p for (_, p), h in zip(named, is_head, strict=True) if not h]
        heads = [p for (_, p), h in zip(named, is_head, strict=True) if h]
        return ([{"params": body}] if body else []) + ([{"params": heads, "lr": float(hl)}] if heads else [])

    def train_stage(self, stage: str) -> None:
        """Train ``stage`` and write its checkpoint."""
        self._set_trainable(stage)
        named = trainable(self.model)
        if not named:
            raise ConfigError(f"{stage}: no trainable parameters (is stage1.prefix / "
                              f"stage2.{self.cfg['stage2']['method']} set?)")
        plan = self.plans[stage]  # planned (and checked) with the data, before any phase ran
        t = time.time()
        loss = train_stage(self, plan, named, self._param_groups(stage, named), self.trainable_counts[stage])
        save_stage_checkpoint(self.out, stage, self.model, patched=self.patched,
                              full=stage_mode(self.cfg, stage) == "full", main=self.di.main, fsdp=self.fsdp)
        if self.di.main:
            for folder in folder_copies(run_folder.state_dir(self.out)):  # the state and its older copies
                shutil.rmtree(folder, ignore_errors=True)
        # the training time of this invocation (a resumed stage: its remaining steps)
        self.event({"event": "stage", "stage": stage, "seconds": round(time.time() - t, 1)})
        self.log(f"{stage}: done, final loss {loss:.4f}; checkpoint {run_folder.checkpoint_dir(self.out, stage)}")
        barrier(self.di)

    def adopt_stage1(self, source: str) -> None:
        """Stage 1 as the finished run ``source`` trained it: its prefix, loaded into this model
        (whose LoRA/adapters keep their initial values), saved as this run's stage-1 checkpoint."""
        path = complete_dir(run_folder.checkpoint_dir(source, "stage1"))
        if path is None or not self.patched:
            raise ConfigError(f"stage 1 was to come from {source}, which has no complete stage-1 checkpoint")
        self._set_trainable("stage1")
        load_prefix(self.model, path)
        save_stage_checkpoint(self.out, "stage1", self.model, patched=True, full=False, main=self.di.main,
                              fsdp=False)
        self.log(f"stage1: the prefix of {path} (a run with the same stage-1 settings and seed)")
        barrier(self.di)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, phase: str) -> None:
        """Score the model, record the row and the predictions (main process)."""
        set_eval(self.model, self.patched)
        t = time.time()
        result = self.task.evaluate(self, phase)
        if result is not None:
            label = self.task.method_label(self.cfg, phase)
            trained = self.trainable_counts.get(phase.replace("eval_", ""), 0)
            row, line = record_eval(self.out, phase, label, self.task.kind, result, trained, time.time() - t)
            self.event(row)
            self.log(line)
        barrier(self.di)
