"""Save and load only the PT-PEFT parameters (safetensors + JSON), atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic_files import atomic_write_bytes
from .config import PTPeftConfig, check_version
from .merging import merge_prefixes
from .patch_state import get_state
from .patching import patch, unpatch
from .stages import STAGES, mark_trainable, parameter_groups, set_stage
from .tuners.lora import lora_of, merge_lora, unmerge_lora
from .version import __version__

WEIGHTS_NAME = "ptpeft.safetensors"
CONFIG_NAME = "ptpeft_config.json"
FORMAT = 1


def ptpeft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PT-PEFT parameters (prefix, LoRA, adapter, and marked extras) by name.

    Parameters sharded by FSDP2 (DTensors) are gathered whole, which is a collective:
    under FSDP every rank must call this.
    """
    groups = parameter_groups(model)
    return {n: full_value(p.detach()) for n, p in model.named_parameters() if groups[n] != "base"}


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered whole (a collective); any other tensor as it is."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def save(model: nn.Module, path: str | os.PathLike, extra_meta: dict[str, Any] | None = None,
         tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the PT-PEFT parameters and config to directory ``path`` and return it.

    Files: ``ptpeft.safetensors`` and ``ptpeft_config.json`` (which records the model type,
    the tensor shapes and the SHA-256 of the weights file, so a mismatched pair is refused).
    ``tensors``: the :func:`ptpeft_state_dict` already gathered (FSDP: every rank gathers,
    one rank saves); by default it is taken from the model.
    """
    from safetensors.torch import save as st_save

    state = get_state(model)
    path = Path(path)
    if tensors is None:
        tensors = ptpeft_state_dict(model)
    tensors = {n: t.contiguous().cpu() for n, t in tensors.items()}
    _refuse_non_finite(tensors, "not saved: the previous checkpoint (if any) is kept; find where training diverged "
                                "(a lower learning rate, or train.precision=fp32)")
    blob = st_save(tensors, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "ptpeft_fast_version": __version__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "config": state.config.to_dict(),
        "extra_trainable": list(state.extra_trainable),
        "lora_merged": any(getattr(lin, lin._ptpeft_lora).merged for lin in state.lora_layers.values()),
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        **(extra_meta or {}),
    }
    atomic_write_bytes(path / WEIGHTS_NAME, blob)
    atomic_write_bytes(path / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return path


def _refuse_non_finite(tensors: dict[str, torch.Tensor], consequence: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"tensor {name} holds {bad} NaN/Inf value(s) of {t.numel()}; {consequence}")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint directory, with clear errors for bad input."""
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} does not exist: is {path} a directory written by ptpeft_fast.save?")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{cfg} is not a ptpeft_fast checkpoint config")
    if int(meta.get("format", 0)) > FORMAT:
        raise ValueError(f"{cfg} has format {meta['format']}, newer than this ptpeft_fast reads ({FORMAT}); "
                         "upgrade ptpeft_fast")
    return meta


# Config keys that change a patched model's outputs; the others (dropout, init_std, freeze_prefix,
# backend) only matter while training or for speed, and may differ between a checkpoint and a model.
OUTPUT_KEYS = {
    "prefix": ("num_tokens", "reparam", "hidden_size", "components", "positions"),
    "lora": ("r", "alpha", "targets", "components"),
    "adapter": ("bottleneck", "style", "activation", "components"),
}


def config_differences(saved: PTPeftConfig, current: PTPeftConfig) -> list[str]:
    """``"key: saved value != model value"`` for every key where the two configs give different outputs.

    A static prefix (``reparam="none"``) saved from a merged model fits a model whose prefix is
    reparameterised: :func:`load` makes the model's prefixes static first."""
    out = []
    for section, keys in OUTPUT_KEYS.items():
        a, b = getattr(saved, section), getattr(current, section)
        if (a is None) != (b is None):
            out.append(f"{section}: {'on' if a is not None else 'off'} in the checkpoint, "
                       f"{'on' if b is not None else 'off'} in the model")
            continue
        if a is None:
            continue
        for key in keys:
            va, vb = getattr(a, key), getattr(b, key)
            if section == "prefix" and key == "reparam" and va == "none":
                continue
            if section == "prefix" and key == "hidden_size" and "none" in (a.reparam, b.reparam):
                continue  # no MLP on one side: its width is moot
            if va != vb:
                out.append(f"{section}.{key}: {_show(va)} in the checkpoint, {_show(vb)} in the model")
    if (saved.targets or None) != (current.targets or None):
        out.append(f"targets: {saved.targets!r} in the checkpoint, {current.targets!r} in the model")
    return out


def _show(v: Any) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


def load(model: nn.Module, path: str | os.PathLike, reconfigure: bool = False,
         stage: str | None = "eval") -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` and return it, ready for ``stage``.

    By default the model comes back for inference, as ``PeftModel.from_pretrained`` gives it: stage
    ``"eval"`` (eval mode, nothing trainable, dropout off). To go on training pass the stage
    (``stage="peft"``) or call :func:`ptpeft_fast.set_stage` afterwards; ``stage=None`` leaves the
    stage as it was (a patched model you set up yourself; a fresh model: what ``patch`` sets).

    An unpatched model is patched with the saved config first. A patched model must have been
    patched with a config that gives the same outputs (LoRA ``r``/``alpha``/targets, the prefix's
    length, reparameterisation, positions and components, the adapter's shape and activation): a
    difference raises ``ValueError`` listing every differing key with both values, unless
    ``reconfigure=True``, which removes the model's PT-PEFT modules and patches it again with the
    saved config. The model type, every tensor name and every shape are checked. A model whose LoRA
    is merged stays merged, with the loaded weights; checkpoints of merged and unmerged models load
    into either.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"load(stage={stage!r}): not one of {STAGES} (or None to keep the model's stage)")
    path = Path(path)
    meta, tensors = _read_checkpoint(model, path)
    saved_config = PTPeftConfig.from_dict(meta["config"])
    if getattr(model, "_ptpeft", None) is None:
        snapshot = _pre_patch_snapshot(model)
        patch(model, saved_config)
        try:
            if meta.get("extra_trainable"):
                mark_trainable(model, *meta["extra_trainable"])
            return _ready(_load_into(model, path, meta, tensors), stage)
        except BaseException:
            _rollback_patch(model, snapshot)  # do not leave a half-loaded, patched model behind
            raise
    state = get_state(model)
    differences = config_differences(saved_config, state.config)
    if differences and not reconfigure:
        raise ValueError(f"checkpoint {path} was saved with another config than this model's: " + "; ".join(differences)
                         + ". Patch the model with the checkpoint's config (or load into an unpatched model), or "
                         "pass reconfigure=True to rebuild its PT-PEFT modules from the checkpoint")
    if differences:
        keep = state.stage if stage is None else stage
        unpatch(model)
        return load(model, path, stage=keep)  # patched with the saved config, like any unpatched model
    if saved_config.prefix is not None and saved_config.prefix.reparam == "none" \
            and state.config.prefix is not None and state.config.prefix.reparam != "none":
        merge_prefixes(model)  # the checkpoint holds merged (static) prefixes
    return _ready(_load_into(model, path, meta, tensors), stage)


def load_prefix(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load only the prefix of a checkpoint into a patched model, leaving its LoRA and adapters as
    they are: a prefix-tuned stage 1 (saved from a model patched with the prefix alone) becomes the
    start of stage 2 in a model patched with the prefix and LoRA or adapters, as PT-PEFT's second
    stage begins. The model's stage is unchanged.

    The checkpoint's prefix section must give the same outputs as the model's (length,
    reparameterisation, components; else ``ValueError`` listing the differences), and it must hold
    prefix tensors only, with the model's names and shapes.
    """
    path = Path(path)
    if getattr(model, "_ptpeft", None) is None:
        raise ValueError("load_prefix needs a patched model: call ptpeft_fast.patch(model, config) first "
                         "(or ptpeft_fast.load for a whole checkpoint)")
    meta, tensors = _read_checkpoint(model, path)
    saved = PTPeftConfig.from_dict(meta["config"])
    current = get_state(model).config
    if saved.prefix is None or current.prefix is None:
        raise ValueError(f"load_prefix: the prefix is {'off' if saved.prefix is None else 'on'} in checkpoint {path} "
                         f"and {'off' if current.prefix is None else 'on'} in the model; both need one")
    differences = [d for d in config_differences(saved, current) if d.startswith("prefix.")]
    if differences:
        raise ValueError(f"load_prefix: checkpoint {path} has another prefix than this model's: "
                         + "; ".join(differences))
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    not_prefix = sorted(n for n in tensors if groups.get(n) != "prefix")
    if not_prefix:
        raise ValueError(f"load_prefix: checkpoint {path} holds tensors that are not this model's prefix "
                         f"({not_prefix[:3]}{'...' if len(not_prefix) > 3 else ''}); use ptpeft_fast.load for a "
                         "whole checkpoint")
    missing = sorted(n for n, g in groups.items() if g == "prefix" and n not in tensors)
    if missing:
        raise ValueError(f"load_prefix: checkpoint {path} lacks prefix tensors of this model ({missing[:3]})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"load_prefix: tensor {name}: checkpoint shape {tuple(t.shape)} != model shape "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return model


def _read_checkpoint(model: nn.Module, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's metadata and tensors, checked (checksum, finiteness, model type, version)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    meta = read_meta(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; the checkpoint is incomplete")
    blob = weights.read_bytes()
    if meta.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights} does not match the checksum in {CONFIG_NAME}: "
                         "the file is truncated or from another save")
    try:
        tensors = st_load(blob)
    except (SafetensorError, Exception) as e:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from None
    _refuse_non_finite(tensors, f"{weights} was not loaded (it was saved from a diverged model)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta.get("model_type") != model_type:
        raise ValueError(f"checkpoint {path} was saved from model_type {meta.get('model_type')!r}, "
                         f"but this model is {model_type!r}")
    check_version(meta["config"], path / CONFIG_NAME)  # a config written by a newer ptpeft_fast
    return meta, tensors


def _ready(model: nn.Module, stage: str | None) -> nn.Module:
    if stage is not None:
        set_stage(model, stage)
    return model


def _pre_patch_snapshot(model: nn.Module) -> dict[str, Any]:
    return {"requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}, "training": model.training}


def _rollback_patch(model: nn.Module, snapshot: dict[str, Any]) -> None:
    """Undo the ``patch`` that :func:`load` applied, after a failure (best effort)."""
    if model.__dict__.get("_ptpeft") is None:
        return
    unpatch(model)
    for n, p in model.named_parameters():
        p.requires_grad_(snapshot["requires_grad"].get(n, p.requires_grad))
    model.train(snapshot["training"])


def _load_into(model: nn.Module, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    own = ptpeft_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                         "(was it saved with another config?)")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"tensor {name}: checkpoint shape {tuple(t.shape)} "
                             f"!= model shape {tuple(own[name].shape)} "
                             "(was the checkpoint saved from a model of another size or architecture?)")
    # LoRA factors are kept after a merge, so a checkpoint is the same whether its model was merged;
    # a merged model's base weights hold its own B·A: take that out, load, fold the new one in
    merged = [layer for layer in get_state(model).lora_layers.values() if lora_of(layer).merged]
    for layer in merged:
        unmerge_lora(layer)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    for layer in merged:
        merge_lora(layer)
    return model
