"""``save_merged``: a plain Hugging Face checkpoint with LoRA folded in, plus the static prefix.

The output directory holds

- the files of ``model.save_pretrained`` (``config.json``, ``model.safetensors``, ...) with
  every LoRA update folded into its base weight and none of ptpeft_fast's child modules
  (prefix, LoRA factors): ``AutoModel*.from_pretrained(out_dir)`` loads it without this
  library and without warnings about unexpected keys;
- ``prefix.safetensors`` (only when the model has a prefix): the static K and V
  ``[Hkv, P, D]`` of every prefixed attention layer, keys ``<attention module path>.key`` /
  ``.value``, with the prefix settings in the file's metadata;
- ``README.txt``: how to load the two.

The user's model is not modified: the merged weights are computed into a separate state dict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..atomic_files import atomic_write_bytes, atomic_write_text, temporary_name
from ..config import PrefixConfig, PTPeftConfig
from ..patch_state import get_state
from ..patching import patch
from ..quantized import densify_state_dict, quantized_base
from ..stages import parameter_groups
from ..tuners.adapter import BottleneckAdapter
from ..tuners.lora import LoraWeights, is_conv1d, lora_of
from ..tuners.prefix import GlobalPrefixMLP, LayerPrefix
from .peft import static_kv

__all__ = ["PREFIX_FILE", "README_FILE", "load_static_prefix", "save_merged"]

PREFIX_FILE = "prefix.safetensors"
README_FILE = "README.txt"
PREFIX_FORMAT = 1

_README = """\
Saved by ptpeft_fast.save_merged from a PT-PEFT model.

1. The model (LoRA already merged into the weights) is a plain Hugging Face checkpoint:

       from transformers import {cls}
       model = {cls}.from_pretrained("{name}")

   It loads without ptpeft_fast. On its own it is the base model + LoRA, WITHOUT the prefix.
{prefix_note}"""

_PREFIX_NOTE = """
2. The learned prefix is in {file}: static keys and values [Hkv, P, D] per attention layer
   (P = {P} tokens, keys "<attention module>.key" / ".value"; prefix keys are never rotated;
   positions="{positions}": real tokens take positions {pos_text}).
   To run the full model with ptpeft_fast:

       from ptpeft_fast.interop import load_static_prefix
       load_static_prefix(model, "{name}")   # patches a prefix-only config and loads K/V
       model.eval()
{plain_note}"""

_PLAIN_SHIFT = """
   Without ptpeft_fast: the prefix is exactly a KV cache that already holds P tokens. Put
   each layer's (key, value), unsqueezed to batch size, into a transformers DynamicCache
   (layer order as in the file), pass it as past_key_values, prepend P ones to the
   attention mask, and pass position_ids = P + (attention_mask.cumsum(-1) - 1).clamp(min=0)
   (real tokens numbered from the mask, as ptpeft_fast and generate do; without it a
   left-padded row would be numbered from its first pad).
"""
_PLAIN_KEEP = """
   Without ptpeft_fast there is no exact equivalent: the prefix was trained with real tokens
   at positions 0..L-1, while a KV cache of P tokens would shift them to P..P+L-1.
"""


def _own_module_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of every module ptpeft_fast added (their state must not be saved)."""
    ours = (LayerPrefix, GlobalPrefixMLP, LoraWeights, BottleneckAdapter)
    return [name + "." for name, m in model.named_modules() if name and isinstance(m, ours)]


def _dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point base weights (a quantized model's norms and embeddings)."""
    groups = parameter_groups(model)
    return next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and groups[n] == "base"),
                torch.float32)


def _is_quantized(model: nn.Module) -> bool:
    return any(quantized_base(m) is not None for m in model.modules())


def _save_dense(model: nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """A plain full-precision checkpoint of a quantized model: its config without the
    quantisation settings, and ``sd`` (de-quantised) as ``model.safetensors``."""
    import copy

    from safetensors.torch import save_file
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = _dense_dtype(model)
    config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    seen: set[int] = set()
    tensors = {}
    for k, v in sd.items():  # tied weights (an LM head sharing the embedding) are saved once
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every (unmerged) LoRA update folded into its weight.

    Keys of ptpeft_fast's own modules are left out; the model itself is not changed. The weights
    of bitsandbytes 4-bit and 8-bit layers are de-quantised first (to the dtype of the model's
    other floating-point weights), so the result is a full-precision model.
    """
    state = get_state(model)
    drop = _own_module_prefixes(model)
    sd = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in drop)}
    densify_state_dict(model, sd, _dense_dtype(model))  # a quantized base: its weights de-quantised
    for path, layer in state.lora_layers.items():
        lora = lora_of(layer)
        if lora.merged:
            continue  # the weight already holds the update
        key = f"{path}.weight"
        w = sd[key]
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = lora.delta_weight().to(device=w.device, dtype=acc)
        sd[key] = (w.to(acc) + (delta.t() if is_conv1d(layer) else delta)).to(w.dtype)
    return sd


def save_merged(model: nn.Module, out_dir: str | os.PathLike, **save_pretrained_kwargs) -> Path:
    """Write a plain Hugging Face checkpoint of ``model`` with LoRA merged, plus the static prefix.

    Args:
        model: a model patched by :func:`ptpeft_fast.patch` (a ``transformers`` model).
        out_dir: output directory (created).
        **save_pretrained_kwargs: passed on to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        ``Path(out_dir)``.

    A model loaded in bitsandbytes 4-bit or 8-bit is written de-quantised, in the dtype of its other
    weights, without its quantisation config: a full-precision model with LoRA merged (merging into
    the 4-bit weights would re-quantise them; :func:`ptpeft_fast.merge` refuses that).

    Raises:
        ValueError: the model has bottleneck adapters (nonlinear: they cannot be folded into a
            plain checkpoint; use :func:`ptpeft_fast.save`), or is not a transformers model.
    """
    state = get_state(model)
    if state.adapters:
        raise ValueError("save_merged: the model has bottleneck adapters, which are nonlinear and cannot be merged "
                         "into plain weights; save them with ptpeft_fast.save(model, dir) and load with "
                         "ptpeft_fast.load")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_merged: {type(model).__name__} has no save_pretrained; it is not a transformers model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = merged_state_dict(model)
    config = getattr(model, "config", None)
    # the saved config must not ask for the "ptpeft" attention, which a plain install lacks
    current = getattr(config, "_attn_implementation", None) if config is not None else None
    if config is not None and state.prefix_layers:
        config._attn_implementation = state.previous_attn_implementation
    staging = Path(temporary_name(out))  # save_pretrained writes here; each file is then renamed into out
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if _is_quantized(model):
            _save_dense(model, sd, staging)
        else:
            model.save_pretrained(staging, state_dict=sd, **save_pretrained_kwargs)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if config is not None and state.prefix_layers:
            config._attn_implementation = current
    prefix_note = ""
    if state.prefix_layers:
        pc = state.config.prefix
        prefixes = list(state.prefix_layers.items())
        ks, vs = static_kv(prefixes)
        tensors = {}
        for (path, _), k, v in zip(prefixes, ks, vs, strict=True):
            tensors[f"{path}.key"] = k.contiguous()
            tensors[f"{path}.value"] = v.contiguous()
        static = dataclasses.replace(pc, reparam="none")
        meta = {
            "format": str(PREFIX_FORMAT),
            "model_type": str(getattr(config, "model_type", None)),
            "prefix_config": json.dumps({k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(static).items()}),
            "targets": json.dumps(state.config.targets),
        }
        from safetensors.torch import save as st_save

        atomic_write_bytes(out / PREFIX_FILE, st_save(tensors, metadata=meta))
        P = pc.num_tokens
        prefix_note = _PREFIX_NOTE.format(file=PREFIX_FILE, P=P, positions=pc.positions, name=out,
                                          pos_text=f"{P}..{P}+L-1" if pc.positions == "shift" else "0..L-1",
                                          plain_note=_PLAIN_SHIFT if pc.positions == "shift" else _PLAIN_KEEP)
    atomic_write_text(out / README_FILE, _README.format(cls=type(model).__name__, name=out, prefix_note=prefix_note))
    return out


def load_static_prefix(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch a plain model (e.g. loaded from a :func:`save_merged` directory) with the saved static prefix.

    Args:
        model: an unpatched transformers model of the same architecture.
        path: the :func:`save_merged` directory, or its ``prefix.safetensors`` file.

    Returns:
        ``model``, patched with a prefix-only config (``reparam="none"``) holding the saved K/V,
        in stage ``"eval"``.

    Raises:
        FileNotFoundError: no prefix file. ValueError: a model of another type or shape.
    """
    from safetensors import safe_open

    from ..stages import set_stage

    path = Path(path)
    file = path / PREFIX_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"load_static_prefix: {file} does not exist (the model was saved without a prefix?)")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"load_static_prefix: {file} is not a readable safetensors file ({e})") from None
    if int(meta.get("format", "0")) > PREFIX_FORMAT:
        raise ValueError(f"load_static_prefix: {file} has format {meta['format']}, newer than this ptpeft_fast reads")
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    if meta.get("model_type") != model_type:
        raise ValueError(f"load_static_prefix: {file} was saved from model_type {meta.get('model_type')!r}, this model "
                         f"is {model_type!r}")
    pc = PrefixConfig(**json.loads(meta["prefix_config"]))
    targets = json.loads(meta.get("targets", "null"))
    patch(model, PTPeftConfig(prefix=pc, lora=None, adapter=None, targets=targets))
    state = get_state(model)
    want = {f"{p}.{kv}" for p in state.prefix_layers for kv in ("key", "value")}
    if want != set(tensors):
        raise ValueError(f"load_static_prefix: {file} holds prefixes for other layers than this model's "
                         f"(missing {sorted(want - set(tensors))[:3]}, unexpected {sorted(set(tensors) - want)[:3]})")
    with torch.no_grad():
        for p, prefix in state.prefix_layers.items():
            for kv in ("key", "value"):
                own, t = getattr(prefix, kv), tensors[f"{p}.{kv}"]
                if own.shape != t.shape:
                    raise ValueError(f"load_static_prefix: {p}.{kv}: file shape {tuple(t.shape)} != model shape "
                                     f"{tuple(own.shape)}")
                own.copy_(t.to(own.dtype))
    set_stage(model, "eval")
    return model
