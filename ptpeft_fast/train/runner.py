"""One training run: zero-shot evaluation, stage 1 (prefix), stage 2 (LoRA / Adapter /
full), an evaluation after each stage, checkpoints, resume and the report.

Determinism: the data order of every epoch is a permutation drawn from a generator
seeded with (seed, stage, epoch), and the checkpoint stores the stage's step, optimizer,
scheduler and RNG states, so a resumed run takes exactly the steps an uninterrupted one
would.  The loss is the sum of token losses over the whole global batch divided by its
token count (all-reduced), so one process and N DDP processes with the same global batch
compute the same gradient.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpoint import full_value
from ..data import RecordDataset, load_split
from ..metrics import compute_metrics
from . import report
from ..atomic_files import atomic_write_text, remove_stale_temporaries
from .checkpointing import (STATE_FORMAT, DamagedState, atomic_dir, complete_dir, folder_copies, folder_damage,
                            read_state, read_tensors)
from .config import ConfigError, dump_config, peft_config_dict
from .distributed import all_reduce, barrier, init_distributed
from .fsdp import gather_named, load_full, load_optimizer_state, optimizer_state, root_unsharded, shard

STATE = "state"               # mid-stage checkpoint folder inside the output dir
PROGRESS = "progress.json"    # completed phases


class NonFinite(Exception):
    """A stage met a non-finite loss or gradient; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C); a resumable checkpoint was written."""


class TrainView:
    """Training items ``(record, image, target)``; captioning uses every reference caption
    as its own sample (the usual COCO practice), VQA the most common answer."""

    def __init__(self, ds: RecordDataset):
        self.ds = ds
        self.index = ([(i, k) for i, r in enumerate(ds.records) for k in range(len(r.targets))]
                      if ds.task == "caption" else [(i, 0) for i in range(len(ds))])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple:
        i, k = self.index[j]
        rec, img = self.ds[i]
        return rec, img, rec.train_target(k)


# ----------------------------------------------------------------------------- the run
class Run:
    """A configured run writing to ``out_dir``.  ``execute()`` does every phase not yet
    recorded in ``progress.json`` and returns the result rows."""

    def __init__(self, cfg: dict, out_dir: str, resume: bool = False, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = out_dir
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
        self.interrupt_requested = False
        self.steps_this_process = 0
        nt = tc["num_threads"] or (max(1, (os.cpu_count() or 1) // self.di.world) if self.di.world > 1 else 0)
        if nt:
            torch.set_num_threads(nt)
        self.fsdp = tc["strategy"] == "fsdp"
        if self.fsdp and self.di.world == 1:
            raise ConfigError("train.strategy=fsdp shards the model across processes: launch with "
                              "torchrun --nproc_per_node N (N >= 2), or use train.strategy=ddp for one process")
        self.autocast_dtype = self._autocast_dtype(tc["precision"])
        self.patched = False
        self.trainable_counts: dict[str, int] = {}

    # -- logging ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.di.main:
            self._log(msg)

    def _event(self, rec: dict) -> None:
        if self.di.main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def _forget_train_records(self, stage: str, after_step: int) -> None:
        """Drop ``stage``'s training records past ``after_step`` from ``metrics.jsonl``: a run
        killed after logging them resumes from an earlier state and logs those steps again."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not self.di.main or not os.path.exists(path):
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

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- setup -----------------------------------------------------------------------------
    def _seed(self, offset: int = 0) -> None:
        s = int(self.cfg["train"]["seed"]) + offset
        random.seed(s)
        torch.manual_seed(s)
        try:
            import numpy as np
            np.random.seed(s % 2**32)
        except ImportError:
            pass

    def _load_model(self) -> None:
        from ..models import build_tiny_blip2, load_local_model
        mc = self.cfg["model"]
        dtype = getattr(torch, mc["dtype"])
        if mc["name"] == "tiny-blip2":
            path = mc["pretrained_path"]
            if path is None and mc["pretrained"]:
                path = ensure_tiny_pretrained("full", log=self.log) if self.di.main else None
                if self.di.world > 1:
                    import torch.distributed as dist
                    box = [path]
                    dist.broadcast_object_list(box, src=0)
                    path = box[0]
            if path:
                model, proc = load_local_model(path, dtype)
            else:
                model, proc = build_tiny_blip2(seed=int(self.cfg["train"]["seed"]), **(mc["tiny"] or {}))
                model = model.to(dtype)
        else:
            model, proc = load_local_model(mc["name"], dtype)
        if mc["gradient_checkpointing"]:
            # transformers 5 renamed gradient_checkpointing_enable (now deprecated); accept either
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        # FSDP: stay on the CPU; fully_shard moves each rank's shard to its device
        self.model = model if self.fsdp else model.to(self.device)
        self.processor = proc

    def _load_data(self) -> None:
        """Read the splits (before the model: bad data fails fast, naming file and record)."""
        dc = self.cfg["data"]
        task = dc["task"]
        prompt = dc["prompt"]
        if prompt is None:
            prompt = "question: {question} answer:" if task == "vqa" else ""
        need_train = self.cfg["stage1"]["enabled"] or self.cfg["stage2"]["enabled"]
        self.train_ds = None
        if need_train:
            ds = load_split(dc, "train", dc["max_train_samples"])
            if ds.skipped_images:
                self.log(f"skipped {ds.skipped_images} unreadable image(s) in data.train")
            self.train_ds = TrainView(ds)
        ev = self.cfg["eval"]
        self.eval_ds = load_split(dc, ev["split"], ev["max_samples"] or dc["max_eval_samples"])
        if self.eval_ds.skipped_images:
            self.log(f"skipped {self.eval_ds.skipped_images} unreadable image(s) in data.{ev['split']}")
        self.prompt = prompt
        self.task = task

    def _make_collators(self) -> None:
        from ..models import MMCollator, has_image_input
        images = has_image_input(self.processor)
        fmt = self.cfg["data"]["format"]
        for split, ds in (("train", self.train_ds.ds if self.train_ds is not None else None),
                          (self.cfg["eval"]["split"], self.eval_ds)):
            if ds is not None and ds.has_images != images:
                raise ConfigError(
                    f"data.{split} (data.format={fmt!r}) " + (
                        f"has images, but model.name={self.cfg['model']['name']!r} is a text-only model (its "
                        "processor is a tokenizer): use data.format=synthetic-text or JSONL records without 'image'"
                        if ds.has_images else
                        f"has no images, but model.name={self.cfg['model']['name']!r} is an image-text model"))
        start = None
        if getattr(self.model.config, "is_encoder_decoder", False):  # e.g. Florence-2: target -> decoder
            cands = [getattr(self.model.generation_config, "decoder_start_token_id", None),
                     getattr(self.model.config, "decoder_start_token_id", None)]
            tc = getattr(self.model.config, "text_config", None)
            cands.append(getattr(tc, "decoder_start_token_id", None) if tc is not None else None)
            start = next((c for c in cands if c is not None), None)
            if start is None:
                raise ConfigError(f"model.name={self.cfg['model']['name']!r}: encoder-decoder model without a "
                                  "decoder_start_token_id (config or generation_config)")
        self.train_collate = MMCollator(self.processor, self.prompt, train=True, decoder_start_token_id=start)
        self.gen_collate = MMCollator(self.processor, self.prompt, train=False, decoder_start_token_id=start)

    def _patch(self) -> None:
        d = peft_config_dict(self.cfg)
        if d is None:
            return
        import ptpeft_fast as pf
        self._seed(1)  # the PT-PEFT initialisation does not depend on what ran before
        pf.patch(self.model, pf.PTPeftConfig.from_dict(d))
        self.patched = True

    # -- progress ----------------------------------------------------------------------------
    def _progress(self) -> list[str]:
        p = os.path.join(self.out, PROGRESS)
        if not os.path.exists(p):
            return []
        with open(p, encoding="utf-8") as f:
            return json.load(f)["done"]

    def _mark_done(self, phase: str) -> None:
        if self.di.main:
            done = self._progress() + [phase]
            atomic_write_text(os.path.join(self.out, PROGRESS), json.dumps({"done": done}))
        barrier(self.di)

    def phases(self) -> list[str]:
        """The phases of this run, in order."""
        c = self.cfg
        stages = [s for s in ("stage1", "stage2") if c[s]["enabled"]]
        ph = ["zero_shot"] if c["eval"]["zero_shot"] else []
        for s in stages:
            ph.append(s)
            if c["eval"]["after_each_stage"] or s == stages[-1]:
                ph.append(f"eval_{s}")
        if not ph:
            raise ConfigError("nothing to do: eval.zero_shot is false and both stage1.enabled and "
                              "stage2.enabled are false")
        return ph

    def method_label(self, phase: str) -> str:
        """Row label in the results table."""
        names = {"lora": "LoRA", "adapter": "Adapter", "full": "Full FT"}
        if phase == "zero_shot":
            return "zero-shot"
        if phase == "eval_stage1":
            return "Prefix"
        m = names[self.cfg["stage2"]["method"]]
        return f"PT-{m}" if self.cfg["stage1"]["enabled"] else m

    # -- main entry -------------------------------------------------------------------------
    def execute(self) -> list[dict]:
        """Run (or continue) every phase; returns the evaluation rows."""
        os.makedirs(self.out, exist_ok=True) if self.di.main else None
        barrier(self.di)
        if self.di.main:
            stale = remove_stale_temporaries(self.out)
            if stale:
                self.log(f"removed {len(stale)} half-written file(s) of an earlier killed run "
                         f"(e.g. {os.path.relpath(stale[0], self.out)}); the complete copies are kept")
            atomic_write_text(os.path.join(self.out, "config.yaml"), dump_config(self.cfg))
        self._seed(0)
        self._load_data()
        self._load_model()
        self._make_collators()
        done = self._progress() if self.resume else []
        phases = self.phases()
        t0 = time.time()
        patched_yet = False
        if self.fsdp:
            # patch and restore finished stages before sharding; zero-shot then runs with the
            # PT-PEFT modules bypassed (pf.disabled), which computes the unpatched model
            self._patch()
            patched_yet = True
            for ph in phases:
                if ph in done and ph in ("stage1", "stage2"):
                    self._load_stage_checkpoint(ph)
            name = type(self.model).__name__  # before fully_shard renames the class (FSDP<name>)
            units = shard(self.model, self.device, self.di.world)
            self.log(f"fsdp: {units} units ({name} blocks + root) sharded over "
                     f"{self.di.world} processes")
        for ph in phases:
            if ph != "zero_shot" and not patched_yet:
                self._patch()
                patched_yet = True
            if ph in done:
                if ph in ("stage1", "stage2") and not self.fsdp:
                    self._load_stage_checkpoint(ph)
                continue
            if ph == "zero_shot":
                with self._unpatched():
                    self._eval_phase(ph)
            elif ph.startswith("eval_"):
                self._eval_phase(ph)
            else:
                self._train_stage(ph)
            self._mark_done(ph)
        rows = self.rows()
        if self.di.main:
            self.write_report(rows)
            self.log(f"done in {time.time() - t0:.0f}s; results: {os.path.join(self.out, 'results.md')}")
        barrier(self.di)
        return rows

    def _unpatched(self):
        """The model as it was before ``patch`` (only patched here under FSDP)."""
        if not self.patched:
            return contextlib.nullcontext()
        import ptpeft_fast as pf
        return pf.disabled(self.model)

    # -- checkpoints ------------------------------------------------------------------------
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _save_stage_checkpoint(self, stage: str) -> None:
        if not (self.di.main or self.fsdp):
            return
        from ..checkpoint import ptpeft_state_dict
        # under FSDP every rank takes part in the gathers and rank 0 writes
        tensors = ptpeft_state_dict(self.model) if self.patched else None
        # full fine-tuning changes base weights, which ptpeft_fast.save leaves out
        full = (gather_named(list(self.model.named_parameters()), keep=self.di.main)
                if self._stage_mode(stage) == "full" else None)
        if not self.di.main:
            return
        path = os.path.join(self.out, "checkpoints", stage)
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def write(tmp: str) -> None:
            if self.patched:
                import ptpeft_fast as pf
                pf.save(self.model, tmp, tensors=tensors)
            if full is not None:
                from safetensors.torch import save_file
                save_file(full, os.path.join(tmp, "full_model.safetensors"))
        atomic_dir(path, write)

    def _load_stage_checkpoint(self, stage: str) -> None:
        final = os.path.join(self.out, "checkpoints", stage)
        path = complete_dir(final)
        if path is None:
            copies = folder_copies(final)
            what = folder_damage(copies[0]) if copies else f"{final} is missing"
            raise DamagedState(f"{self.out}: {stage} is marked done but {what}: restore it, or start the run again "
                               "in a new output folder")
        if self.patched and os.path.exists(os.path.join(path, "ptpeft_config.json")):
            import ptpeft_fast as pf
            pf.load(self.model, path)
        full = os.path.join(path, "full_model.safetensors")
        if os.path.exists(full):
            from safetensors.torch import load_file
            sd = load_file(full)
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in sd.items():
                    params[n].copy_(t)
        self.log(f"resumed: {stage} loaded from {path}")

    def _save_state(self, stage: str, step: int, opt, sched, scaler) -> None:
        """Mid-stage checkpoint: trainable tensors, optimizer, scheduler, RNG, position.

        Safetensors and JSON only (no pickle: a run folder may come from anyone); the copy it
        replaces stays as ``state.prev``, the fallback if this one is later found damaged."""
        if self.fsdp:  # gathered whole on rank 0 (collectives: every rank)
            params = gather_named(self._trainable(), keep=self.di.main)
            optim = optimizer_state(self.model, opt)
        elif self.di.main:
            params = gather_named(self._trainable(), keep=True)
            optim = opt.state_dict()
        if not self.di.main:
            barrier(self.di)
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
                {"format": STATE_FORMAT, "stage": stage, "step": step, "fsdp": self.fsdp, "state": body}))
        atomic_dir(os.path.join(self.out, STATE), write, keep_previous=True)
        barrier(self.di)

    def _load_state(self, stage: str):
        """The newest undamaged mid-stage state of ``stage`` (None: start the stage from step 0).

        A damaged newest copy falls back to the previous one, saying which file was damaged;
        with no usable copy the run stops (:class:`DamagedState`) naming the file and the fix."""
        final = os.path.join(self.out, STATE)
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
                self.log(f"warning: {problems[0]}; continuing {stage} from step {st['step']} with the previous "
                         f"state ({path})")
            break
        else:
            if problems:
                raise DamagedState(f"{problems[0]}: delete {final} (and {final}.prev) to restart {stage} from "
                                   "its start, or restore the file")
            return None
        params = dict(self._trainable())
        if set(sd) != set(params):
            raise RuntimeError(f"{path}: the saved trainable parameters do not match this run's stage {stage}")
        if bool(st.get("fsdp")) != self.fsdp:
            raise ConfigError(f"{path} was written with train.strategy={'fsdp' if st.get('fsdp') else 'ddp'}; "
                              "resume with the same strategy")
        for n, t in sd.items():
            load_full(params[n], t)
        self.log(f"resumed: {stage} from step {st['step']} ({path})")
        return st

    # -- training ---------------------------------------------------------------------------
    def _stage_mode(self, stage: str) -> str:
        if stage == "stage1":
            return "prefix"
        return "full" if self.cfg["stage2"]["method"] == "full" else "peft"

    def _perm(self, stage: str, epoch: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.cfg["train"]["seed"]) * 1_000_003 + (7919 if stage == "stage2" else 0) + epoch)
        return torch.randperm(n, generator=g)

    def _model_inputs(self, batch: dict) -> dict:
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

    def _train_unpatched(self, stage: str) -> None:
        """requires_grad for a stage of a model without PT-PEFT modules (plain full fine-tune)."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train()

    def _param_groups(self, stage: str, named: list) -> list[dict]:
        """The optimizer's parameter groups for ``stage`` (one group at the stage's lr here)."""
        return [{"params": [p for _, p in named]}]

    def _batch_count(self, b: dict) -> int:
        """The loss normaliser's share of one micro-batch (here: target tokens)."""
        return int((b["labels"][:, 1:] != -100).sum())

    def _batch_loss(self, fwd, b: dict) -> torch.Tensor:
        """The SUM of the per-token losses of one micro-batch (divided by the global count by the caller)."""
        with self._autocast():
            logits = fwd(**self._model_inputs(b)).logits
        labels = b["labels"].to(self.device)
        # logits cover the label positions (BLIP-2 slices them to labels' length)
        lg = logits[:, -labels.shape[1]:][:, :-1].float()
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    def _train_stage(self, stage: str) -> None:
        sc = self.cfg[stage]
        mode = self._stage_mode(stage)
        if self.patched:
            import ptpeft_fast as pf
            pf.set_stage(self.model, mode)
            self.trainable_counts[stage] = pf.trainable_parameters(self.model)["total"]
        else:  # plain full fine-tune (no PT-PEFT modules)
            self._train_unpatched(stage)
            self.trainable_counts[stage] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        named = self._trainable()
        if not named:
            raise ConfigError(f"{stage}: no trainable parameters (is stage1.prefix / stage2.{self.cfg['stage2']['method']} set?)")
        opt = torch.optim.AdamW(self._param_groups(stage, named), lr=sc["lr"], weight_decay=sc["weight_decay"])
        G, accum, world = sc["batch_size"], sc["grad_accum"], self.di.world
        if G % (accum * world):
            raise ConfigError(f"{stage}.batch_size={G} must be divisible by grad_accum×processes={accum}×{world}")
        micro = G // (accum * world)
        n = len(self.train_ds)
        spe = n // G
        if spe == 0:
            raise ConfigError(f"{stage}.batch_size={G} is larger than the training set ({n} samples)")
        total = sc["max_steps"] or sc["epochs"] * spe
        warm = int(round(sc["warmup_ratio"] * total))
        mlr = sc["min_lr_ratio"]

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            prog = (step - warm) / max(1, total - warm)
            return mlr + (1 - mlr) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        start = 0
        st = self._load_state(stage) if self.resume else None
        if st is not None:
            if self.fsdp:
                load_optimizer_state(self.model, opt, st["optimizer"])
            else:
                opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if scaler and st["scaler"]:
                scaler.load_state_dict(st["scaler"])
            torch.set_rng_state(st["rng_torch"])
            random.setstate(st["rng_python"])
            start = st["step"]
        if self.resume:
            self._forget_train_records(stage, after_step=start)
        fwd = self.model
        if world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg["train"]["compile"]:
            # one graph per stage (the stage changes which parameters need gradients); the patched
            # ops add no graph break (tests/test_compile.py). Traced afresh per stage: torch 2.11
            # reused stage 1's graph in stage 2 (its guards missed the requires_grad change, so the
            # LoRA factors got no gradient and stage 2's losses drifted from eager)
            torch._dynamo.reset()
            fwd = torch.compile(fwd, backend=self.cfg["train"]["compile_backend"])
        self.log(f"{stage} ({mode}): {self.trainable_counts[stage]:,} trainable parameters, {total} steps "
                 f"× {G} samples ({n} train samples, {world} process(es))")
        bar = None
        if self.di.main and self.cfg["train"]["progress"]:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, leave=False)
        prev = signal.getsignal(signal.SIGINT)
        if prev is not None and threading_main():
            signal.signal(signal.SIGINT, self._on_sigint)
        self.interrupt_requested = False
        stop_after = self.cfg["train"]["interrupt_after_steps"]
        save_every = self.cfg["output"]["save_every_steps"]
        t_last, samples_since = time.time(), 0
        try:
            for step in range(start, total):
                epoch, pos = divmod(step, spe)
                gidx = self._perm(stage, epoch, n)[pos * G:(pos + 1) * G].tolist()
                batches = []
                for a in range(accum):
                    lo = a * micro * world + self.di.rank * micro
                    batches.append(self.train_collate([self.train_ds[i] for i in gidx[lo:lo + micro]]))
                ntok = torch.tensor(float(sum(self._batch_count(b) for b in batches)))
                ntok = all_reduce(ntok, self.di).clamp_min(1.0)
                loss_total = torch.zeros(())
                for a, b in enumerate(batches):
                    last = a == accum - 1
                    if self.fsdp:
                        self.model.set_requires_gradient_sync(last)  # reduce-scatter once per step
                    sync = contextlib.nullcontext() if (world == 1 or last or self.fsdp) else fwd.no_sync()
                    with sync:
                        loss = self._batch_loss(fwd, b) / ntok.to(self.device) * world
                        (scaler.scale(loss) if scaler else loss).backward()
                    loss_total += loss.detach().cpu()
                if scaler:
                    scaler.unscale_(opt)
                max_norm = self.cfg["train"]["max_grad_norm"] or float("inf")
                grad_norm = full_value(torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm))
                # fp16's loss scaler skips non-finite steps by design; elsewhere they mean divergence
                bad = not bool(torch.isfinite(loss_total)) or (scaler is None and not bool(torch.isfinite(grad_norm)))
                if bool(all_reduce(torch.tensor(float(bad)), self.di, "max")):
                    what = "loss" if not bool(torch.isfinite(loss_total)) else "gradient norm"
                    raise NonFinite(
                        f"{stage}: non-finite {what} at step {step + 1}/{total}; the stage stopped before applying it, "
                        f"and the last good checkpoint is kept in {self.out}. Try a lower learning rate "
                        f"({stage}.lr={sc['lr']:g}) or full precision (train.precision=fp32)")
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                lr = opt.param_groups[0]["lr"]
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.steps_this_process += 1
                loss_val = float(all_reduce(loss_total, self.di)) / world
                samples_since += G
                if bar is not None:
                    dt = max(1e-9, time.time() - t_last)
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", sps=f"{samples_since / dt:.0f}")
                    bar.update(1)
                if (step + 1) % self.cfg["train"]["log_every"] == 0 or step == start or step + 1 == total:
                    self._event({"event": "train", "stage": stage, "step": step + 1, "loss": loss_val, "lr": lr})
                    t_last, samples_since = time.time(), 0
                stop = self.interrupt_requested or (stop_after is not None and self.steps_this_process >= stop_after)
                stop = bool(all_reduce(torch.tensor(float(stop)), self.di, "max"))
                if stop and step + 1 < total:
                    self._save_state(stage, step + 1, opt, sched, scaler)
                    raise Interrupted(f"interrupted in {stage} at step {step + 1}/{total}; "
                                      f"resume with: python -m ptpeft_fast.train --resume {self.out}")
                if save_every and (step + 1) % save_every == 0 and step + 1 < total:
                    self._save_state(stage, step + 1, opt, sched, scaler)
        finally:
            if bar is not None:
                bar.close()
            if prev is not None and threading_main():
                signal.signal(signal.SIGINT, prev)
        self._save_stage_checkpoint(stage)
        if self.di.main:
            for folder in folder_copies(os.path.join(self.out, STATE)):  # the state and its older copies
                shutil.rmtree(folder, ignore_errors=True)
        self.log(f"{stage}: done, final loss {loss_val:.4f}; checkpoint {os.path.join(self.out, 'checkpoints', stage)}")
        barrier(self.di)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupt_requested:  # second Ctrl-C: stop now (the last checkpoint stays valid)
            raise KeyboardInterrupt
        self.interrupt_requested = True
        if self.di.main:
            print("\nCtrl-C: writing a resumable checkpoint after this step (press again to abort)", flush=True)

    # -- evaluation -------------------------------------------------------------------------
    def _set_eval(self) -> None:
        if self.patched:
            import ptpeft_fast as pf
            pf.set_stage(self.model, "eval")
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    @torch.no_grad()
    def generate(self, records_idx: list[int]) -> dict[str, str]:
        """Greedy/beam generation for eval records; returns ``{record id: text}``."""
        ev = self.cfg["eval"]
        tok = self.gen_collate.tok
        preds: dict[str, str] = {}
        for s in range(0, len(records_idx), ev["batch_size"]):
            items = [self.eval_ds[i] for i in records_idx[s:s + ev["batch_size"]]]
            batch = self.gen_collate(items)
            inp = self._model_inputs(batch)
            # FSDP: ranks stop together (synced_gpus) so each runs the same sharded forwards
            with self._autocast(), root_unsharded(self.model):
                out = self.model.generate(**inp, max_new_tokens=ev["max_new_tokens"], num_beams=ev["num_beams"],
                                          do_sample=False, pad_token_id=tok.pad_token_id, synced_gpus=self.fsdp)
            ids = inp["input_ids"]
            if out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]].cpu(), ids.cpu()):
                out = out[:, ids.shape[1]:]  # decoder-only generate returns prompt + continuation
            for rid, text in zip(batch["record_ids"], tok.batch_decode(out, skip_special_tokens=True)):
                preds[rid] = text.strip()
        return preds

    @torch.no_grad()
    def features(self, n: int) -> tuple[list[torch.Tensor], list[int]]:
        """Last-layer language-model hidden states of the first ``n`` eval inputs (image +
        prompt, padding removed). For an encoder-decoder language model (Florence-2) these
        are the ENCODER's last hidden states: the encoder is what reads image + prompt (the
        decoder would only see its start token here)."""
        feats, lens = [], []
        bs = self.cfg["eval"]["batch_size"]
        idx = list(range(min(n, len(self.eval_ds))))
        for s in range(0, len(idx), bs):
            batch = self.gen_collate([self.eval_ds[i] for i in idx[s:s + bs]])
            inp = self._model_inputs(batch)
            with self._autocast():
                out = self.model(**inp, output_hidden_states=True)
            lm = getattr(out, "language_model_outputs", None)
            if getattr(out, "encoder_last_hidden_state", None) is not None:
                hs = out.encoder_last_hidden_state.float().cpu()
            else:
                hs = (lm.hidden_states if lm is not None and getattr(lm, "hidden_states", None) is not None
                      else out.hidden_states)[-1].float().cpu()
            mask = inp["attention_mask"].bool().cpu()
            for h, m in zip(hs, mask):
                f = h[m[-h.shape[0]:]]
                feats.append(f)
                lens.append(f.shape[0])
        return feats, lens

    def _eval_phase(self, phase: str) -> None:
        self._set_eval()
        ev = self.cfg["eval"]
        t = time.time()
        mine = list(range(self.di.rank, len(self.eval_ds), self.di.world))
        if self.fsdp:  # every rank runs as many generate calls (a repeated record answers twice, same id)
            mine += [mine[-1] if mine else 0] * (-(-len(self.eval_ds) // self.di.world) - len(mine))
        preds = self.generate(mine)
        if self.di.world > 1:
            import torch.distributed as dist
            allp: list = [None] * self.di.world
            dist.all_gather_object(allp, preds)
            preds = {k: v for p in allp for k, v in p.items()}
        row = None
        feats = None
        if ev["spectrum"] and (self.di.main or self.fsdp):  # FSDP: every rank runs the sharded forwards
            feats, _ = self.features(ev["spectrum_samples"])
        if self.di.main:
            refs = {r.id: r.targets for r in self.eval_ds.records}
            metrics = compute_metrics(self.task, preds, refs, use_java=ev["use_java"])
            spec = report.spectrum_summary(feats, tau=ev["tau"]) if feats is not None else None
            stage = phase.replace("eval_", "")
            row = {"event": "eval", "phase": phase, "method": self.method_label(phase),
                   "metrics": {k: v for k, v in metrics.items() if k != "n"}, "n": metrics.get("n"),
                   "spectrum": spec, "trainable": self.trainable_counts.get(stage, 0),
                   "seconds": round(time.time() - t, 2)}
            os.makedirs(os.path.join(self.out, "predictions"), exist_ok=True)
            atomic_write_text(os.path.join(self.out, "predictions", f"{phase}.json"), json.dumps(preds, indent=1))
            self._event(row)
            shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row["metrics"].items() if k in report.metric_names(self.task))
            if spec:
                shown += f", rank ratio {spec['remaining_rank_ratio']:.3f}, eff. rank {spec['effective_rank']:.2f}"
            self.log(f"eval {row['method']}: {shown} ({row['seconds']}s)")
        barrier(self.di)

    # -- report -----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Evaluation rows from ``metrics.jsonl`` (latest per phase, in phase order)."""
        p = os.path.join(self.out, "metrics.jsonl")
        by_phase: dict[str, dict] = {}
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    if rec.get("event") == "eval":
                        by_phase[rec["phase"]] = rec
        return [by_phase[ph] for ph in self.phases() if ph in by_phase]

    def write_report(self, rows: list[dict]) -> None:
        """``results.md`` and ``spectrum.png`` from the evaluation rows."""
        write_report(self.out, rows, self.task, self.cfg["eval"]["tau"],
                     title=f"{self.cfg['model']['name']} on {self.cfg['data']['format']} ({self.task})")


def ensure_tiny_pretrained(name: str = "full", cache: str | None = None,
                           log: Callable[[str], None] = print, progress: bool = True) -> str:
    """Path of the caption-pretrained tiny-blip2 for recipe ``name``; trains it if absent."""
    from .config import load_config
    from .pretrain import RECIPES, recipe_path

    final = recipe_path(name, cache)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    r = RECIPES[name]
    log(f"pre-training tiny-blip2 on synthetic-shapes captions ({name} recipe, {r['steps']} steps); "
        f"cached at {final}")
    work = f"{final}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(None, [
        "model.name=tiny-blip2", "model.pretrained=false", "data.task=caption",
        f"data.train.n={r['n_train']}", "data.val.n=100", "stage1.enabled=false",
        "stage2.method=full", f"stage2.max_steps={r['steps']}", f"stage2.batch_size={r['batch_size']}",
        f"stage2.lr={r['lr']}", "stage2.warmup_ratio=0.05", "eval.zero_shot=false", "eval.spectrum=false",
        "eval.use_java=false", "eval.max_new_tokens=12", f"train.seed={r['seed']}", "train.log_every=50",
        f"train.progress={str(progress).lower()}",
        # the tiny model's ops are too small to gain from intra-op threads; one thread avoids
        # the thread hand-off cost (and is far faster on a busy machine)
        "train.num_threads=1",
    ])
    run = Run(cfg, os.path.join(work, "run"), log=log)
    run.execute()
    model_dir = os.path.join(work, "model")
    run.model.save_pretrained(model_dir)
    run.processor.save_pretrained(model_dir)
    shutil.copy(os.path.join(work, "run", "results.md"), os.path.join(model_dir, "pretrain_results.md"))
    if os.path.exists(final):  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
        return final
    os.replace(model_dir, final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def write_report(out: str, rows: list[dict], task: str, tau: float, title: str) -> tuple[str, str | None]:
    """Write ``results.md`` (and ``spectrum.png`` when rows carry spectra); returns paths."""
    md = f"# {title}\n\n" + report.results_table(rows, report.metric_names(task))
    curves = {r["method"]: r["spectrum"]["curve"] for r in rows if r.get("spectrum")}
    png = None
    if curves:
        png = report.plot_spectra(curves, os.path.join(out, "spectrum.png"), tau)
        md += f"\nRemaining-rank ratio: smallest k/K whose cumulative normalised singular-value mass ≥ {tau}; " \
              "effective rank: exp(entropy) of each sample's normalised spectrum, averaged over samples " \
              "(last-layer language features of the evaluation inputs).\n\n![spectrum](spectrum.png)\n"
    atomic_write_text(os.path.join(out, "results.md"), md)
    return os.path.join(out, "results.md"), png


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading
    return threading.current_thread() is threading.main_thread()
