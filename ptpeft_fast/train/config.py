"""The training config: defaults, YAML loading, ``--set`` overrides and validation.

Validation runs before any work and names the offending key.  Sections: ``model``,
``data``, ``stage1``, ``stage2``, ``eval``, ``output`` and ``train`` (run-wide settings:
seed, device, precision, distributed strategy).
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import yaml

# Keys whose value is a free-form mapping (checked by their consumer, not here).
FREE_FORM = {"data.train", "data.val", "data.test", "model.tiny", "stage1.prefix", "stage2.lora",
             "stage2.adapter", "experiment.variants", "experiment.method_overrides", "experiment.lr_sweep"}
# Keys that may be null besides their typed default.
NULLABLE = {"model.pretrained_path", "model.quantize",
            "data.prompt", "eval.stop_at", "data.max_train_samples", "data.max_eval_samples",
            "stage1.max_steps", "stage2.max_steps", "eval.max_samples", "eval.use_java",
            "train.interrupt_after_steps", "output.dir", "stage2.adapter", "stage2.lora",
            "train.max_grad_norm", "data.per_class", "eval.val_samples",
            "stage1.head_lr", "stage2.head_lr", "train.max_tokens"}

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "tiny-blip2",          # "tiny-blip2", "smollm2-135m", "minilm-l6" or a local HF model folder
        "pretrained": True,            # tiny-blip2: use the cached caption-pretrained weights
        "pretrained_path": None,       # tiny-blip2: explicit folder with pre-trained weights
        "dtype": "float32",            # weights dtype: float32 | bfloat16 | float16
        "gradient_checkpointing": False,
        "quantize": None,              # null | nf4 | fp4 | int8: load the base with bitsandbytes (QLoRA); .[quant]
        "tiny": {},                    # tiny-blip2 size overrides (hidden, layers, ...)
    },
    "data": {
        "format": "synthetic-shapes",  # synthetic-shapes | synthetic-text | stdlib-code-captions | coco | ...
        "task": "vqa",                 # vqa | caption
        "prompt": None,                # template; null = "question: {question} answer:" / ""
        "train": {}, "val": {}, "test": {},
        "synthetic": {"seed": 0, "image_size": 32},
        "skip_bad_images": False,
        "max_train_samples": None,
        "max_eval_samples": None,
        # classification (data.format stdlib-docstrings)
        "per_class": None,             # training examples per class (null: all)
        "split_seed": 0,               # stdlib corpora: train/val/test split (fixed across train.seed)
        "max_length": 64,              # tokenizer truncation
    },
    "stage1": {
        "enabled": True,
        "prefix": {"num_tokens": 10, "reparam": "mlp", "hidden_size": 64, "components": ["language"]},
        "epochs": 1, "max_steps": None, "lr": 1e-2, "head_lr": None, "weight_decay": 0.0, "warmup_ratio": 0.1,
        "min_lr_ratio": 0.0, "batch_size": 32, "grad_accum": 1,
    },
    "stage2": {
        "enabled": True,
        "method": "lora",              # lora | adapter | full
        "freeze_prefix": False,
        "lora": {"r": 8, "alpha": 16, "components": ["language"]},
        "adapter": {"bottleneck": 16, "components": ["language"]},
        "epochs": 1, "max_steps": None, "lr": 2e-3, "head_lr": None, "weight_decay": 0.0, "warmup_ratio": 0.1,
        "min_lr_ratio": 0.0, "batch_size": 32, "grad_accum": 1,
    },
    "eval": {
        "split": "val",
        "zero_shot": True,
        "after_each_stage": True,      # false: only after the last enabled stage
        "batch_size": 64,
        "max_new_tokens": 8,
        "num_beams": 1,
        "stop_at": None,               # cut every prediction at this text (after stripping), e.g. "\n"
        "max_samples": None,
        "spectrum": True,
        "spectrum_samples": 128,
        "tau": 0.9,
        "use_java": None,              # null: use Java when it is on PATH
        "spectrum_window": 16,         # classification: first N word-piece tokens per sentence
        "spectrum_text": "prompt",     # generation: prompt | prompt+target (the first reference, teacher-forced)
        "val_every": 0,                # generation: mean target-token loss on the val split every N steps (0: off)
        "val_samples": None,           # records of the val split for that loss (null: all)
    },
    "output": {
        "dir": None,                   # null: runs/<timestamp>
        "save_every_steps": 0,         # 0: checkpoint only at stage end and on Ctrl-C
        "overwrite": False,
    },
    "train": {
        "seed": 0,
        "device": "auto",              # auto | cpu | cuda | cuda:N
        "precision": "auto",           # auto | fp32 | bf16 | fp16 (autocast)
        "strategy": "ddp",             # ddp | fsdp (used under torchrun)
        "max_grad_norm": 1.0,
        "log_every": 10,
        "progress": True,
        "num_threads": 0,              # 0: torch default
        "compile": False,              # torch.compile the model for training (both stages)
        "compile_backend": "inductor", # torch.compile backend (inductor | aot_eager | ...)
        "fused_loss": True,            # the LM head + cross-entropy fused (ptpeft_fast.fused_loss); false: logits
        "packing": False,              # pack each micro-batch's sequences into rows without padding (text decoders)
        "max_tokens": None,            # tokens per packed row (null: one row per micro-batch)
        "interrupt_after_steps": None, # testing: act as if Ctrl-C came after N optimizer steps
    },
    # overrides ("key=value") that `--quick` applies after the file: a preset's short version
    "quick": [],
    # a multi-run experiment: methods x variants x per_class x seeds, aggregated into one
    # results.md; empty methods = one run of the config as it is
    "experiment": {
        "methods": [],                 # names from ptpeft_fast.train.methods.METHODS
        "seeds": [0],
        "per_class": [],               # values of data.per_class to sweep (empty: the config's)
        "variants": {},                # label -> list of "key=value" overrides
        "method_overrides": {},        # method -> list of "key=value" overrides
        "spectrum": True,              # plot spectrum.png
        "lr_sweep": {},                # {seed, grid: {stage1 | method: [lr, ...]}}: chosen on val first (lr_sweep.py)
        "compare": [],                 # [[a, b], ...]: paired differences a - b over seeds (default: PT-X vs X)
    },
}

CHOICES = {
    "data.format": ("synthetic-shapes", "synthetic-text", "stdlib-code-captions", "coco", "vqav2", "jsonl", "hf",
                    "stdlib-docstrings"),
    "data.task": ("vqa", "caption", "classification"),
    "stage2.method": ("lora", "adapter", "full", "head"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quantize": ("nf4", "fp4", "int8"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.strategy": ("ddp", "fsdp"),
    "eval.split": ("train", "val", "test"),
    "eval.spectrum_text": ("prompt", "prompt+target"),
}
POSITIVE = {"stage1.epochs", "stage2.epochs", "stage1.batch_size", "stage2.batch_size",
            "stage1.grad_accum", "stage2.grad_accum", "eval.batch_size", "eval.max_new_tokens",
            "eval.num_beams", "eval.spectrum_samples", "train.log_every", "data.max_length",
            "eval.spectrum_window"}


class ConfigError(ValueError):
    """A bad config value or key; the message names the key."""


def default_config() -> dict:
    """A deep copy of the defaults."""
    return copy.deepcopy(DEFAULTS)


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key {key!r}" +
                              (f"; allowed under {prefix[:-1]!r}: {sorted(base)}" if prefix else
                               f"; sections are {sorted(base)}"))
        if key in FREE_FORM:
            # merged key by key (so --set stage2.lora.r=4 keeps alpha); checked by the consumer
            if isinstance(v, dict) and isinstance(base[k], dict):
                base[k] = {**base[k], **copy.deepcopy(v)}
            else:
                base[k] = copy.deepcopy(v)
        elif isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, key + ".")
        else:
            base[k] = v
    return base


def load_config(path: str | None = None, overrides: list[str] | None = None, quick: bool = False) -> dict:
    """Defaults, then the YAML file at ``path``, then (``quick``) the file's ``quick`` overrides,
    then ``--set a.b=value`` overrides (values parsed as YAML: ``3``, ``1e-3``, ``true``,
    ``[language, vision]``)."""
    cfg = default_config()
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"--config: file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                user = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if user is None:
            raise ConfigError(f"{path} is empty: give the sections to change (model, data, stage1, stage2, eval, "
                              "output, train), or run without --config for the demo")
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _merge(cfg, user)
    if quick:
        if not cfg["quick"]:
            raise ConfigError(f"--quick: {path or 'the defaults'} has no 'quick' list of overrides; "
                              "drop --quick or add e.g. quick: [stage1.max_steps=4]")
        if not isinstance(cfg["quick"], list) or any(not isinstance(o, str) for o in cfg["quick"]):
            raise ConfigError(f"quick must be a list of 'key=value' strings, got {cfg['quick']!r}")
        for ov in cfg["quick"]:
            apply_override(cfg, ov)
    for ov in overrides or []:
        apply_override(cfg, ov)
    validate(cfg)
    return cfg


def apply_override(cfg: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. stage1.lr=1e-3")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    _merge(cfg, nested)


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def validate(cfg: dict) -> None:
    """Check types, choices and cross-field rules; raise :class:`ConfigError` naming the key."""
    def walk(dflt: dict, val: dict, prefix: str) -> None:
        for k, d in dflt.items():
            key = f"{prefix}{k}"
            v = val.get(k)
            if key in FREE_FORM:
                if v is not None and not isinstance(v, dict):
                    raise ConfigError(f"{key} must be a mapping, got {v!r}")
                continue
            if v is None:
                if d is None or key in NULLABLE:
                    continue
                raise ConfigError(f"{key} must not be null")
            if isinstance(d, float) and isinstance(v, str):
                with contextlib.suppress(ValueError):  # PyYAML reads "1e-3" (no dot) as a string
                    v = val[k] = float(v)
            if isinstance(d, dict):
                if not isinstance(v, dict):
                    raise ConfigError(f"{key} must be a mapping, got {v!r}")
                walk(d, v, key + ".")
            elif d is not None and not _type_ok(d, v):
                raise ConfigError(f"{key} must be {type(d).__name__}, got {v!r}")
            if key in CHOICES and v not in CHOICES[key]:
                raise ConfigError(f"{key}={v!r} is not allowed; choose one of {CHOICES[key]}")
            if key in POSITIVE and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    walk(DEFAULTS, cfg, "")
    for s in ("stage1", "stage2"):
        sc = cfg[s]
        if isinstance(sc["head_lr"], str):  # PyYAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                sc["head_lr"] = float(sc["head_lr"])
        if sc["head_lr"] is not None and (isinstance(sc["head_lr"], bool) or not isinstance(sc["head_lr"], (int, float))
                                          or sc["head_lr"] <= 0):
            raise ConfigError(f"{s}.head_lr must be a positive number or null, got {sc['head_lr']!r}")
        if sc["lr"] <= 0:
            raise ConfigError(f"{s}.lr must be > 0, got {sc['lr']!r}")
        if not 0 <= sc["warmup_ratio"] < 1:
            raise ConfigError(f"{s}.warmup_ratio must be in [0, 1), got {sc['warmup_ratio']!r}")
        if not 0 <= sc["min_lr_ratio"] <= 1:
            raise ConfigError(f"{s}.min_lr_ratio must be in [0, 1], got {sc['min_lr_ratio']!r}")
        if sc["max_steps"] is not None and (not isinstance(sc["max_steps"], int) or sc["max_steps"] < 1):
            raise ConfigError(f"{s}.max_steps must be a positive integer or null, got {sc['max_steps']!r}")
        if sc["batch_size"] % sc["grad_accum"]:
            raise ConfigError(f"{s}.batch_size ({sc['batch_size']}) must be divisible by {s}.grad_accum "
                              f"({sc['grad_accum']})")
    max_tokens = cfg["train"]["max_tokens"]
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"train.max_tokens must be a positive integer or null, got {max_tokens!r}")
    if cfg["train"]["packing"]:
        if cfg["data"]["task"] == "classification":
            raise ConfigError("train.packing=true packs generation tasks (caption, vqa); the classification task "
                              "reads one sentence per row: set train.packing=false")
        if cfg["train"]["strategy"] == "fsdp":
            raise ConfigError("train.packing=true with train.strategy=fsdp: ranks may pack their batches into "
                              "different numbers of rows, which FSDP's collectives cannot take; use strategy=ddp")
    stop = cfg["eval"]["stop_at"]
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise ConfigError(f"eval.stop_at must be a non-empty string or null, got {stop!r}")
    ev = cfg["eval"]
    if isinstance(ev["val_every"], bool) or not isinstance(ev["val_every"], int) or ev["val_every"] < 0:
        raise ConfigError(f"eval.val_every must be 0 (off) or a positive number of steps, got {ev['val_every']!r}")
    if ev["val_samples"] is not None and (isinstance(ev["val_samples"], bool) or not isinstance(ev["val_samples"], int)
                                          or ev["val_samples"] < 1):
        raise ConfigError(f"eval.val_samples must be a positive integer or null, got {ev['val_samples']!r}")
    if ev["val_every"] and cfg["data"]["task"] == "classification":
        raise ConfigError("eval.val_every is for the generation tasks (caption, vqa); the classification task "
                          "reports its scores after each stage instead: set eval.val_every=0")
    if not 0 < cfg["eval"]["tau"] <= 1:
        raise ConfigError(f"eval.tau must be in (0, 1], got {cfg['eval']['tau']!r}")
    dc = cfg["data"]
    if (dc["task"] == "classification") != (dc["format"] == "stdlib-docstrings"):
        raise ConfigError(f"data.task={dc['task']!r} with data.format={dc['format']!r}: the classification task "
                          "reads data.format=stdlib-docstrings (and that format is classification only)")
    if dc["format"] == "synthetic-text" and dc["task"] != "vqa":
        raise ConfigError(f"data.task={dc['task']!r} with data.format='synthetic-text': that format is text-only "
                          "VQA (the scene's caption is in the prompt); set data.task=vqa")
    if dc["format"] == "stdlib-code-captions" and dc["task"] != "caption":
        raise ConfigError(f"data.task={dc['task']!r} with data.format='stdlib-code-captions': that format is code "
                          "captioning (a def line in, its docstring's first sentence out); set data.task=caption")
    if dc["per_class"] is not None and (not isinstance(dc["per_class"], int) or dc["per_class"] < 1):
        raise ConfigError(f"data.per_class must be a positive integer or null, got {dc['per_class']!r}")
    if cfg["stage2"]["method"] == "head":
        if dc["task"] != "classification":
            raise ConfigError("stage2.method=head (linear probe: only the task head trains) needs "
                              "data.task=classification")
        if cfg["stage1"]["enabled"] and cfg["stage2"]["enabled"]:
            raise ConfigError("stage2.method=head is a linear probe without PT-PEFT modules; set "
                              "stage1.enabled=false (the head already trains in the prefix stage)")
    ex = cfg["experiment"]
    for k in ("methods", "seeds", "per_class"):
        if not isinstance(ex[k], list):
            raise ConfigError(f"experiment.{k} must be a list, got {ex[k]!r}")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in ex["seeds"]) or not ex["seeds"]:
        raise ConfigError(f"experiment.seeds must be a non-empty list of integers, got {ex['seeds']!r}")
    if any(not isinstance(s, int) or s < 1 for s in ex["per_class"]):
        raise ConfigError(f"experiment.per_class must be positive integers, got {ex['per_class']!r}")
    if ex["methods"]:
        from .methods import METHODS
        bad = [m for m in ex["methods"] if m not in METHODS]
        if bad:
            raise ConfigError(f"experiment.methods: unknown {bad}; choose from {sorted(METHODS)}")
        if dc["task"] == "classification" and "zero-shot" in ex["methods"]:
            raise ConfigError("experiment.methods: 'zero-shot' is for generation tasks (caption, vqa); a "
                              "classifier's untrained head is 'pretrained' (random head, one row per seed)")
    q = cfg["model"]["quantize"]
    if q is not None:
        mc = cfg["model"]
        if mc["name"] == "tiny-blip2" and not mc["pretrained_path"] and not mc["pretrained"]:
            raise ConfigError("model.quantize loads weights with bitsandbytes; model.name=tiny-blip2 with "
                              "model.pretrained=false is built from a config, not loaded: set model.quantize=null")
        if dc["task"] == "classification":
            raise ConfigError(f"model.quantize={q}: the classification task's encoder is not loaded quantized; set "
                              "model.quantize=null")
        if cfg["stage2"]["enabled"] and cfg["stage2"]["method"] == "full":
            raise ConfigError(f"model.quantize={q} with stage2.method=full: quantized weights cannot be trained; "
                              "use lora or adapter, or model.quantize=null")
        if cfg["train"]["strategy"] == "fsdp":
            raise ConfigError(f"model.quantize={q} with train.strategy=fsdp is not supported; use ddp")
    pairs = ex["compare"]
    if not isinstance(pairs, list) or (ex["methods"] and any(
            not isinstance(p, list) or len(p) != 2 or any(m not in ex["methods"] for m in p) for p in pairs)):
        raise ConfigError(f"experiment.compare must be a list of [a, b] pairs of experiment.methods, got {pairs!r}")
    if ex["methods"]:  # without methods the config is one run and the experiment section is unused
        _check_lr_sweep(ex["lr_sweep"] or {}, ex["methods"], cfg["eval"]["val_every"])
    for k in ("variants", "method_overrides"):
        for name, ovs in (ex[k] or {}).items():
            if not isinstance(ovs, list) or any(not isinstance(o, str) or "=" not in o for o in ovs):
                raise ConfigError(f"experiment.{k}.{name} must be a list of 'key=value' strings, got {ovs!r}")
    if cfg["data"]["format"] != "synthetic-shapes" and cfg["model"]["name"] == "tiny-blip2":
        pass  # allowed: tiny-blip2's word-level vocabulary just maps unknown words to <unk>
    peft_config_dict(cfg)  # the PT-PEFT sections are validated by the core's own config


def peft_config_dict(cfg: dict) -> dict | None:
    """The ``PTPeftConfig.from_dict`` input for this run, or None when nothing is patched
    (a plain full fine-tune, or no stage at all).  Errors name the config key."""
    s1, s2 = cfg["stage1"], cfg["stage2"]
    method = s2["method"] if s2["enabled"] else None
    d = {
        "prefix": dict(s1["prefix"] or {}) if s1["enabled"] else None,
        "lora": dict(s2["lora"] or {}) if method == "lora" else None,
        "adapter": dict(s2["adapter"] or {}) if method == "adapter" else None,
        "freeze_prefix": bool(s2["freeze_prefix"]),
        "fused_loss": bool(cfg["train"]["fused_loss"]),
    }
    if method == "lora" and s2["lora"] is None:
        raise ConfigError("stage2.lora must be a mapping when stage2.method=lora")
    if method == "adapter" and s2["adapter"] is None:
        raise ConfigError("stage2.adapter must be a mapping when stage2.method=adapter")
    if d["prefix"] is None and d["lora"] is None and d["adapter"] is None:
        return None
    from ..config import PTPeftConfig
    try:
        PTPeftConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        where = {"prefix": "stage1.prefix", "lora": "stage2.lora", "adapter": "stage2.adapter"}
        msg = str(e)
        for k, v in where.items():
            msg = msg.replace(f"'{k}.", f"'{v}.").replace(f" {k}.", f" {v}.")
            if msg.startswith(f"{k}."):
                msg = v + msg[len(k):]
        raise ConfigError(msg) from None
    return d


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def _check_lr_sweep(sweep: dict, methods: list[str], val_every: int) -> None:
    """A ``ConfigError`` naming what is wrong with ``experiment.lr_sweep`` (empty: no sweep)."""
    if not sweep:
        return
    from .methods import METHODS
    unknown = sorted(set(sweep) - {"seed", "grid", "steps"})
    if unknown:
        raise ConfigError(f"experiment.lr_sweep: unknown keys {unknown}; it takes seed, grid and steps")
    steps = sweep.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"experiment.lr_sweep.steps must be a positive integer (or absent), got {steps!r}")
    if isinstance(sweep.get("seed"), bool) or not isinstance(sweep.get("seed"), int):
        raise ConfigError(f"experiment.lr_sweep.seed must be an integer, got {sweep.get('seed')!r}")
    grid = sweep.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("experiment.lr_sweep.grid must map 'stage1' or a method name to a list of learning rates")
    for key, lrs in grid.items():
        if key != "stage1" and (key not in methods or "stage2.enabled=true" not in METHODS[key][1]):
            raise ConfigError(f"experiment.lr_sweep.grid.{key}: not 'stage1' nor a method of experiment.methods "
                              "with a stage 2")
        if (not isinstance(lrs, list) or not lrs
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in lrs)):
            raise ConfigError(f"experiment.lr_sweep.grid.{key} must be a non-empty list of positive numbers, "
                              f"got {lrs!r}")
    if not val_every:
        raise ConfigError("experiment.lr_sweep chooses by the validation loss: set eval.val_every (e.g. 25)")
