"""Interoperability with PEFT checkpoints: :func:`from_peft` and :func:`to_peft`.

PEFT formats handled (peft >= 0.17, checked against 0.21):

- **LoRA**: ``adapter_config.json`` (``peft_type: "LORA"``) and ``adapter_model.safetensors``
  with keys ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
  ``[out, r]``; the update is ``(lora_alpha / r) · B A`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``). Our LoRA stores the same factors (``lora_A [r, in]``, ``lora_B [out, r]``)
  in a child ``lora_<component>`` of the same linear layer, so the mapping is one to one.
- **Prefix tuning** (``peft_type: "PREFIX_TUNING"``, decoder-only models): PEFT saves one
  tensor ``prompt_embeddings [P, layers·2·Hkv·D]``, viewed as ``[P, layers·2, Hkv, D]``;
  layer ``l``'s key is index ``2l``, its value ``2l+1``. PEFT feeds it as a KV cache, so
  real tokens get positions ``P..P+L-1``: our ``positions="shift"``. One difference remains:
  in a plain forward without ``position_ids``, PEFT numbers a *left-padded* row from its first
  pad, while a patched model numbers real tokens from the attention mask (as ``generate``
  does in both); unpadded and right-padded batches, and ``generate``, give identical outputs. With
  ``prefix_projection=True`` PEFT still saves only the *projected* K/V (its MLP is not in
  the file), so such a directory loads as static K/V (``reparam="none"``). The MLP itself
  (``embedding [P, token_dim]``, ``transform.0: Linear(token_dim, h)``, tanh,
  ``transform.2: Linear(h, layers·2·token_dim)``) is our ``reparam="mlp-global"``; it is
  loaded when present: from an in-memory ``PeftModel`` passed as ``source``, or from a
  weights file that holds ``embedding.weight`` / ``transform.*`` keys.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import (
    ARCHITECTURES,
    attention_geometry,
    iter_in_scope,
    resolve_components,
)
from ..config import LoraConfig, PrefixConfig, PTPeftConfig, lora_scaling
from ..patch_state import get_state
from ..patching import patch
from ..tuners.lora import is_conv1d, lora_of
from ..tuners.prefix import GlobalPrefixMLP, LayerPrefix

__all__ = ["PeftInteropError", "from_peft", "to_peft"]

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."

# LoRA options of PEFT that change the computation in ways our LoRA does not express.
# Each maps to the value (or values) meaning "off".
_LORA_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, [], ()),
    "layer_replication": (None, [], ()),
    "target_parameters": (None, [], ()),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
}


class PeftInteropError(ValueError):
    """A PEFT checkpoint (or an export to one) that ptpeft_fast cannot represent exactly."""


# --------------------------------------------------------------------------------------
# reading a PEFT source
# --------------------------------------------------------------------------------------
def _read_source(source: Any,
                 adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(adapter config dict, saved-format weights, prompt-encoder MLP state or None)."""
    if isinstance(source, (str, os.PathLike)):
        return _read_dir(Path(source))
    peft_config = getattr(source, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError("from_peft: source must be a PEFT checkpoint directory or a PeftModel, got "
                        f"{type(source).__name__}")
    if adapter_name not in peft_config:
        raise PeftInteropError(f"from_peft: the PeftModel has no adapter {adapter_name!r}; it has "
                               f"{sorted(peft_config)}")
    cfg = peft_config[adapter_name].to_dict()
    cfg = {k: (v.value if hasattr(v, "value") else v) for k, v in cfg.items()}
    if isinstance(cfg.get("target_modules"), set):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if cfg.get("peft_type") == "PREFIX_TUNING":
        encoder = source.prompt_encoder[adapter_name]
        state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        if cfg.get("prefix_projection") and "transform.0.weight" in state:
            return cfg, {}, state
        return cfg, {"prompt_embeddings": source.get_prompt_embedding_to_save(adapter_name)}, None
    from peft import get_peft_model_state_dict

    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(source, adapter_name=adapter_name).items()}
    return cfg, weights, None


def _read_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"from_peft: {cfg_file} does not exist; is {path} a directory written by "
                                "PeftModel.save_pretrained?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PeftInteropError(f"from_peft: {cfg_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise PeftInteropError(f"from_peft: {cfg_file} has no 'peft_type'; it is not a PEFT adapter config")
    safe, binf = path / SAFE_WEIGHTS, path / BIN_WEIGHTS
    if safe.is_file():
        from safetensors.torch import load_file

        try:
            weights = load_file(str(safe))
        except Exception as e:  # safetensors raises its own error type for bad headers / truncation
            raise PeftInteropError(f"from_peft: {safe} is not a readable safetensors file ({e}); is it "
                                   "truncated?") from None
    elif binf.is_file():
        weights = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"from_peft: {path} has neither {SAFE_WEIGHTS} nor {BIN_WEIGHTS}")
    mlp = None
    if cfg["peft_type"] == "PREFIX_TUNING":
        mlp = _mlp_from_keys(weights)
    return cfg, weights, mlp


def _mlp_from_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A prompt-encoder MLP saved by hand (``embedding.weight``, ``transform.{0,2}.*`` keys)."""
    wanted = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
    found = {}
    for w in wanted:
        hits = [k for k in weights if k == w or k.endswith("." + w)]
        if len(hits) == 1:
            found[w] = weights[hits[0]]
    return found if len(found) == len(wanted) else None


# --------------------------------------------------------------------------------------
# from_peft
# --------------------------------------------------------------------------------------
def from_peft(model: nn.Module, source: str | os.PathLike | nn.Module, *, config: PTPeftConfig | None = None,
              adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA adapter or prefix-tuning checkpoint into ``model`` (in place) and return it.

    Args:
        model: a plain Hugging Face model (it is patched with a config derived from the PEFT
            config, or with ``config`` when given) or a model already patched by
            :func:`ptpeft_fast.patch` whose LoRA/prefix modules match the checkpoint (the other
            sections, e.g. a prefix when loading LoRA, are left as they are).
        source: a directory written by ``PeftModel.save_pretrained`` (``adapter_config.json``
            and ``adapter_model.safetensors`` or ``.bin``), or an in-memory ``PeftModel``
            (whose prefix-projection MLP, not saved by PEFT, is then loaded as ``mlp-global``).
        config: the PT-PEFT config to patch an unpatched model with (default: derived).
        adapter_name: which adapter of an in-memory ``PeftModel``.

    Returns:
        ``model``, whose outputs now equal the PEFT model's on the same inputs.

    Raises:
        PeftInteropError: a PEFT option we cannot represent exactly (DoRA, rank patterns,
            ``modules_to_save``, encoder-decoder prefix tuning, ...), or a checkpoint that does
            not fit the model; the message names the option or tensor.
        FileNotFoundError: missing files.
    """
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise PeftInteropError("from_peft: pass the plain base model, not a PeftModel (the PEFT checkpoint is the "
                               "source)")
    cfg, weights, mlp = _read_source(source, adapter_name)
    peft_type = cfg.get("peft_type")
    if peft_type == "LORA":
        return _load_lora(model, cfg, weights, config)
    if peft_type == "PREFIX_TUNING":
        return _load_prefix(model, cfg, weights, mlp, config)
    raise PeftInteropError(f"from_peft: peft_type {peft_type!r} is not supported; ptpeft_fast reads LORA and "
                           "PREFIX_TUNING")


def _lora_paths(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": [r,in], "B": [out,r]}}`` from PEFT's saved keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in weights.items():
        k = key.removeprefix(_PEFT_PREFIX)
        for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if k.endswith(part):
                out.setdefault(k[: -len(part)], {})[tag] = t
                break
        else:
            bad.append(key)
    if bad:
        raise PeftInteropError("from_peft: the adapter holds tensors that are not LoRA A/B factors of linear layers: "
                               f"{bad[:5]} (embedding LoRA, DoRA magnitudes, modules_to_save and LoRA biases are not "
                               "supported)")
    for path, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise PeftInteropError(f"from_peft: {path} has lora_{'A' if 'A' in ab else 'B'} but not the other factor")
    if not out:
        raise PeftInteropError("from_peft: the adapter holds no LoRA weights")
    return out


def _check_lora_options(cfg: dict[str, Any]) -> None:
    for key, off in _LORA_UNSUPPORTED.items():
        value = cfg.get(key)
        is_off = value is None or (isinstance(value, (list, tuple, dict, set)) and not value) or value in off
        if not is_off:
            raise PeftInteropError(f"from_peft: PEFT LoRA option {key}={value!r} is not supported by ptpeft_fast "
                                   "(its LoRA is plain W + (alpha/r)·B·A on linear layers)")


def _component_of_paths(model: nn.Module, paths: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The components holding ``paths`` and the block-relative target names that pick them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PeftInteropError(f"from_peft: model_type {model_type!r} is not in ptpeft_fast's architecture table; "
                               "pass config=PTPeftConfig(..., targets=...) to say where the LoRA layers are")
    where: dict[str, tuple[str, str]] = {}
    for name in ARCHITECTURES[model_type]:
        try:
            comps = resolve_components(model, (name,))
        except ValueError:
            continue
        for comp in comps:
            for p in comp.direct:
                where.setdefault(p, (name, ""))
            if comp.family is None:
                continue
            for bname, block in comp.blocks:
                for rel, _ in iter_in_scope(block, comp.family):
                    where.setdefault(f"{bname}.{rel}", (name, rel))
    missing = [p for p in paths if p not in where]
    if missing:
        raise PeftInteropError(f"from_peft: LoRA layers {missing[:5]} are outside every component ptpeft_fast knows "
                               f"for {model_type!r}; pass config=PTPeftConfig(..., targets=...)")
    components = tuple(dict.fromkeys(where[p][0] for p in paths))
    targets = tuple(sorted({where[p][1] for p in paths if where[p][1]}))
    return components, targets


def _load_lora(model: nn.Module, cfg: dict[str, Any], weights: dict[str, torch.Tensor],
               config: PTPeftConfig | None) -> nn.Module:
    _check_lora_options(cfg)
    paths = _lora_paths(weights)
    ranks = {ab["A"].shape[0] for ab in paths.values()}
    if len(ranks) != 1:
        raise PeftInteropError(f"from_peft: the adapter mixes LoRA ranks {sorted(ranks)}; ptpeft_fast uses one rank "
                               "per config")
    r = ranks.pop()
    if cfg.get("r") not in (None, r):
        raise PeftInteropError(f"from_peft: adapter_config says r={cfg.get('r')} but the weights have rank {r}")
    peft_alpha = float(cfg.get("lora_alpha", 8))
    # rsLoRA scales by alpha / sqrt(r); we keep alpha / r and choose the alpha that gives the same factor
    scaling = peft_alpha / math.sqrt(r) if cfg.get("use_rslora") else lora_scaling(peft_alpha, r)
    names = dict(model.named_modules())
    absent = sorted(p for p in paths if p not in names)
    if absent:
        raise PeftInteropError(f"from_peft: the adapter has LoRA on modules this model does not have: {absent[:3]}"
                               f"{'...' if len(absent) > 3 else ''} (an adapter for another base model? it names "
                               f"base_model_name_or_path={cfg.get('base_model_name_or_path')!r})")
    if getattr(model, "_ptpeft", None) is None:
        if config is None:
            components, targets = _component_of_paths(model, sorted(paths))
            config = PTPeftConfig(prefix=None, adapter=None,
                                  lora=LoraConfig(r=r, alpha=scaling * r,
                                                  dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                                                  targets=targets or None, components=components))
        patch(model, config)
    state = get_state(model)
    if not state.lora_layers:
        raise PeftInteropError("from_peft: the model is patched without LoRA; patch it with a lora section to load a "
                               "LoRA adapter")
    params: list[tuple[torch.Tensor, torch.Tensor]] = []
    for path, ab in paths.items():
        layer = state.lora_layers.get(path)
        if layer is None:
            raise PeftInteropError(f"from_peft: the adapter has LoRA on {path}, which has no LoRA in this model "
                                   f"(its LoRA layers: {sorted(state.lora_layers)[:4]}...)")
        lora = lora_of(layer)
        if lora.merged:
            raise PeftInteropError(f"from_peft: the LoRA of {path} is merged into its weight; load into an unmerged "
                                   "model")
        for tag, own in (("A", lora.lora_A), ("B", lora.lora_B)):
            if tuple(ab[tag].shape) != tuple(own.shape):
                raise PeftInteropError(f"from_peft: {path}.lora_{tag}: checkpoint shape {tuple(ab[tag].shape)} != "
                                       f"model shape {tuple(own.shape)}")
            params.append((own, ab[tag]))
        if not math.isclose(lora.scaling, scaling, rel_tol=1e-6):
            raise PeftInteropError(f"from_peft: {path} has scaling {lora.scaling:g} but the adapter's is {scaling:g} "
                                   "(lora_alpha / r); patch with the adapter's alpha and r")
    with torch.no_grad():
        for own, t in params:
            own.copy_(t.to(device=own.device, dtype=own.dtype))
    return model


def _language_attention(model: nn.Module, config: PTPeftConfig | None) -> list[tuple[str, nn.Module]]:
    comps = resolve_components(model, ("language",), config.targets if config is not None else None)
    out = []
    for comp in comps:
        if comp.family is None:
            continue
        out += [(f"{b}.{rel}", blk.get_submodule(rel)) for b, blk in comp.blocks for rel in comp.family.attention]
    return out


def _load_prefix(model: nn.Module, cfg: dict[str, Any], weights: dict[str, torch.Tensor],
                 mlp: dict[str, torch.Tensor] | None, config: PTPeftConfig | None) -> nn.Module:
    if (int(cfg.get("num_transformer_submodules") or 1) != 1
            or getattr(getattr(model, "config", None), "is_encoder_decoder", False)):
        raise PeftInteropError("from_peft: PEFT prefix tuning of encoder-decoder models (num_transformer_submodules=2) "
                               "is not supported; ptpeft_fast reads decoder-only prefix checkpoints")
    P, n_layers = int(cfg["num_virtual_tokens"]), int(cfg["num_layers"])
    token_dim, heads = int(cfg["token_dim"]), int(cfg["num_attention_heads"])
    if token_dim % heads:
        raise PeftInteropError(f"from_peft: token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
    head_dim = token_dim // heads
    use_mlp = mlp is not None
    if getattr(model, "_ptpeft", None) is None:
        if config is None:
            config = PTPeftConfig(lora=None, adapter=None, prefix=PrefixConfig(
                num_tokens=P, reparam="mlp-global" if use_mlp else "none", positions="shift", components=("language",),
                hidden_size=int(mlp["transform.0.weight"].shape[0]) if use_mlp else 512))
        layers = _language_attention(model, config)
        if len(layers) != n_layers:
            raise PeftInteropError(f"from_peft: the checkpoint has prefixes for {n_layers} layers but the model's "
                                   f"language component has {len(layers)} attention layers (wrong base model?)")
        patch(model, config)
    state = get_state(model)
    pc = state.config.prefix
    if pc is None or not state.prefix_layers:
        raise PeftInteropError("from_peft: the model is patched without a prefix; patch it with a prefix section")
    if pc.positions != "shift":
        warnings.warn("from_peft: PEFT prefix tuning gives real tokens positions P..P+L-1 (positions='shift'); this "
                      "model uses positions='keep', so its outputs will differ from PEFT's", stacklevel=2)
    prefixes = list(state.prefix_layers.items())
    if len(prefixes) != n_layers:
        raise PeftInteropError(f"from_peft: the checkpoint has prefixes for {n_layers} layers but the model has "
                               f"{len(prefixes)} prefixed attention layers")
    for path, prefix in prefixes:
        if prefix.num_tokens != P or (prefix.kv_heads, prefix.head_dim) != (heads, head_dim):
            raise PeftInteropError(f"from_peft: {path}: model prefix is P={prefix.num_tokens}, [Hkv={prefix.kv_heads}, "
                                   f"D={prefix.head_dim}] but the checkpoint has P={P}, [{heads}, {head_dim}]")
    if use_mlp:
        _copy_mlp(state, prefixes, mlp, P, n_layers, token_dim)
    else:
        _copy_static(model, prefixes, weights, P, n_layers, heads, head_dim)
    return model


def _copy_static(model, prefixes, weights, P, n_layers, heads, head_dim) -> None:
    if "prompt_embeddings" not in weights:
        raise PeftInteropError("from_peft: the prefix checkpoint has no 'prompt_embeddings' tensor (keys: "
                               f"{sorted(weights)[:5]})")
    emb = weights["prompt_embeddings"]
    want = (P, n_layers * 2 * heads * head_dim)
    if tuple(emb.shape) != want:
        raise PeftInteropError(f"from_peft: prompt_embeddings has shape {tuple(emb.shape)}, expected {want}")
    kv = emb.reshape(P, n_layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # [layers, 2, Hkv, P, D]
    for index, (_path, prefix) in enumerate(prefixes):
        if prefix.reparam != "none":
            prefix.to_static()
        with torch.no_grad():
            prefix.key.copy_(kv[index, 0].to(prefix.key.dtype))
            prefix.value.copy_(kv[index, 1].to(prefix.value.dtype))
        prefix._cache = None
    # a shared MLP that no layer uses any more would still train and be saved: drop it
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, GlobalPrefixMLP):
                delattr(mod, name)
    state = get_state(model)
    state.config.prefix.reparam = "none"


def _copy_mlp(state, prefixes, mlp, P, n_layers, token_dim) -> None:
    shared = prefixes[0][1]._shared[0] if prefixes[0][1]._shared else None
    if shared is None or any(p.reparam != "mlp-global" for _, p in prefixes):
        raise PeftInteropError("from_peft: the checkpoint has PEFT's prefix-projection MLP; the model's prefix must "
                               "use reparam='mlp-global' to hold it")
    emb, w0, b0, w2, b2 = (mlp[k] for k in ("embedding.weight", "transform.0.weight", "transform.0.bias",
                                            "transform.2.weight", "transform.2.bias"))
    hidden = w0.shape[0]
    embed_dim = shared.embedding.shape[1]
    if tuple(emb.shape) != (P, token_dim) or tuple(w2.shape) != (n_layers * 2 * token_dim, hidden):
        raise PeftInteropError(f"from_peft: prefix MLP shapes embedding {tuple(emb.shape)}, transform.2 "
                               f"{tuple(w2.shape)} do not fit P={P}, token_dim={token_dim}, layers={n_layers}")
    if (tuple(shared.mlp_in.weight.shape) != (hidden, embed_dim)
            or tuple(shared.mlp_out.weight.shape) != tuple(w2.shape)):
        raise PeftInteropError(f"from_peft: model prefix MLP is [{embed_dim}→{shared.mlp_in.weight.shape[0]}→"
                               f"{shared.mlp_out.weight.shape[0]}] but PEFT's is [{token_dim}→{hidden}→{w2.shape[0]}]; "
                               f"patch with prefix.hidden_size={hidden}")
    if token_dim > embed_dim:
        raise PeftInteropError(f"from_peft: PEFT token_dim {token_dim} exceeds the model's prefix embedding width "
                               f"{embed_dim}")
    with torch.no_grad():
        # PEFT's embedding is token_dim = Hkv·D wide, ours H·D (wider under GQA): zero-pad both the
        # embedding and the first Linear's input columns. E'W'ᵀ = EWᵀ exactly, and the padded
        # entries get zero gradient (each multiplies only the other's zeros), so training matches too.
        shared.embedding.zero_()
        shared.embedding[:, :token_dim].copy_(emb.to(shared.embedding.dtype))
        shared.mlp_in.weight.zero_()
        shared.mlp_in.weight[:, :token_dim].copy_(w0.to(shared.mlp_in.weight.dtype))
        shared.mlp_in.bias.copy_(b0.to(shared.mlp_in.bias.dtype))
        shared.mlp_out.weight.copy_(w2.to(shared.mlp_out.weight.dtype))
        shared.mlp_out.bias.copy_(b2.to(shared.mlp_out.bias.dtype))
    for _, prefix in prefixes:
        prefix._cache = None


# --------------------------------------------------------------------------------------
# to_peft
# --------------------------------------------------------------------------------------
def _base_name(model: nn.Module, given: str | None) -> str | None:
    if given is not None:
        return given
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def to_peft(model: nn.Module, out_dir: str | os.PathLike, *, adapter: str = "auto", static_prefix: bool = False,
            base_model_name_or_path: str | None = None) -> Path:
    """Export the model's LoRA (or its prefix) as a PEFT checkpoint in ``out_dir`` and return the path.

    ``PeftModel.from_pretrained(base_model, out_dir)`` then gives the same outputs as this model.

    Args:
        model: a model patched by :func:`ptpeft_fast.patch`.
        out_dir: directory to write ``adapter_config.json`` and ``adapter_model.safetensors`` to.
        adapter: ``"lora"``, ``"prefix"`` or ``"auto"`` (the only one the model has). A PEFT
            adapter holds one method, so a model with both a prefix and LoRA must pick one, and
            the other is NOT in the export (outputs then differ from this model's).
        static_prefix: allow exporting a reparameterised prefix (``mlp``, ``mlp-global``) as the
            static K/V it currently computes (evaluation mode, no dropout); the MLP is not exported
            (PEFT does not save its own projection MLP either). The model is not changed.
        base_model_name_or_path: recorded in ``adapter_config.json`` (default: the model's own).

    Raises:
        PeftInteropError: when PEFT cannot represent the export exactly, with the reason:
            merged LoRA, a ``positions="keep"`` prefix on a model without rotary positions (a RoPE
            model's prefix keys are rotated by P on export, which makes PEFT's outputs equal ours),
            a reparameterised prefix without
            ``static_prefix=True``, a prefix outside a decoder-only language model or not on
            every layer, bottleneck adapters, or ``adapter="auto"`` with several kinds present.
    """
    state = get_state(model)
    has = {"lora": bool(state.lora_layers), "prefix": bool(state.prefix_layers), "adapter": bool(state.adapters)}
    if adapter == "auto":
        kinds = [k for k in ("lora", "prefix") if has[k]]
        if has["adapter"]:
            raise PeftInteropError("to_peft: the model has bottleneck adapters, which PEFT's LoRA/prefix formats "
                                   "cannot hold; pass adapter='lora' or adapter='prefix' to export only that part")
        if len(kinds) == 2:
            raise PeftInteropError("to_peft: the model has a prefix and LoRA (PT-LoRA), which PEFT cannot run together "
                                   "in one model: export the whole model for plain transformers with "
                                   "ptpeft_fast.save_merged(model, out_dir), or one part with adapter='lora' or "
                                   "adapter='prefix' (the other part is then not in PEFT's outputs)")
        if not kinds:
            raise PeftInteropError("to_peft: the model has neither LoRA nor a prefix to export")
        adapter = kinds[0]
    if adapter not in ("lora", "prefix"):
        raise ValueError(f"to_peft: adapter={adapter!r}; choose 'auto', 'lora' or 'prefix'")
    if not has[adapter]:
        raise PeftInteropError(f"to_peft: the model has no {adapter} to export")
    others = [k for k, v in has.items() if v and k != adapter]
    if others:
        warnings.warn(f"to_peft: exporting only the {adapter}; the model's {' and '.join(others)} is not in the PEFT "
                      "checkpoint, so PEFT's outputs will differ from this model's", stacklevel=2)
    out = Path(out_dir)
    if adapter == "lora":
        cfg, tensors = _export_lora(model, state)
    else:
        cfg, tensors = _export_prefix(model, state, static_prefix)
    cfg["base_model_name_or_path"] = _base_name(model, base_model_name_or_path)
    from safetensors.torch import save as st_save

    from ..atomic_files import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    # each file through a temporary name and a rename (PEFT's format has no checksum list to add)
    atomic_write_bytes(out / SAFE_WEIGHTS, st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                   metadata={"format": "pt"}))
    atomic_write_bytes(out / ADAPTER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return out


def _export_lora(model: nn.Module, state) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    ranks, scalings, dropouts, conv = set(), set(), set(), set()
    for path, layer in state.lora_layers.items():
        lora = lora_of(layer)
        if lora.merged:
            raise PeftInteropError(f"to_peft: the LoRA of {path} is merged into the base weight; call "
                                   "ptpeft_fast.unmerge(model) first (PEFT applies LoRA on the original base weights)")
        ranks.add(lora.r)
        scalings.add(round(lora.scaling, 12))
        dropouts.add(lora.dropout_p)
        conv.add(is_conv1d(layer))
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = lora.lora_A
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = lora.lora_B
    if len(ranks) != 1 or len(scalings) != 1 or len(dropouts) != 1:
        raise PeftInteropError(f"to_peft: LoRA layers differ in rank/scaling/dropout ({ranks}, {scalings}, "
                               f"{dropouts}); PEFT's rank_pattern is not written by ptpeft_fast")
    if len(conv) != 1:
        raise PeftInteropError("to_peft: LoRA sits on both nn.Linear and transformers Conv1D layers; PEFT's "
                               "fan_in_fan_out is one flag per adapter")
    r, scaling = ranks.pop(), scalings.pop()
    cfg = {
        "peft_type": "LORA",
        # CAUSAL_LM gives PeftModelForCausalLM (generate etc.); other models load as a plain PeftModel
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "r": r,
        "lora_alpha": scaling * r,
        "lora_dropout": dropouts.pop(),
        "target_modules": sorted(state.lora_layers),
        "fan_in_fan_out": conv.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return cfg, tensors


def _export_prefix(model: nn.Module, state, static_prefix: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    pc = state.config.prefix
    mconf = getattr(model, "config", None)
    if getattr(mconf, "is_encoder_decoder", False):
        raise PeftInteropError("to_peft: prefix export supports decoder-only causal LMs; this model is encoder-decoder")
    if tuple(pc.components) != ("language",):
        raise PeftInteropError(f"to_peft: the prefix sits in components {pc.components}; PEFT prefix tuning covers "
                               "only the language model's self-attention layers")
    layers = _language_attention(model, state.config)
    prefixes = list(state.prefix_layers.items())
    if [p for p, _ in prefixes] != [p for p, _ in layers]:
        raise PeftInteropError("to_peft: PEFT prefix tuning puts a prefix in every language layer; this model's "
                               "prefixed layers differ from its attention layers")
    if not all(getattr(m, "is_causal", False) for _, m in layers):
        raise PeftInteropError("to_peft: prefix export supports causal (decoder-only) language models; PEFT feeds the "
                               "prefix as a KV cache, which non-causal encoders do not take")
    comp = resolve_components(model, ("language",), state.config.targets)[0]
    rotary = _rotary_module(model, comp) if pc.positions == "keep" else None
    if pc.positions == "keep" and rotary is None:
        raise PeftInteropError("to_peft: the prefix uses positions='keep' (real tokens at 0..L-1) on a model whose "
                               "positions are not rotary (learned or unknown), but PEFT feeds the prefix as a KV "
                               "cache, which shifts real tokens to P..P+L-1, so PEFT's outputs would differ. Train "
                               "with PrefixConfig(positions='shift') to export this model's prefix to PEFT")
    if pc.reparam != "none" or any(p.reparam != "none" for _, p in prefixes):
        if not static_prefix:
            raise PeftInteropError(f"to_peft: the prefix is reparameterised (reparam={pc.reparam!r}); a PEFT "
                                   "checkpoint stores static K/V only. Pass static_prefix=True to export the K/V it "
                                   "computes now (the MLP is not exported), or call ptpeft_fast.merge(model) first")
    geoms = {(p.num_tokens, p.kv_heads, p.head_dim) for _, p in prefixes}
    if len(geoms) != 1:
        raise PeftInteropError(f"to_peft: prefix geometry differs between layers {sorted(geoms)}; PEFT uses one shape "
                               "for all")
    P, hkv, d = geoms.pop()
    peft_heads = getattr(mconf, "num_key_value_heads", None) or hkv
    h, _, _ = attention_geometry(layers[0][1])
    if peft_heads != hkv:
        raise PeftInteropError(f"to_peft: PEFT will size the prefix by {peft_heads} key/value heads but this model's "
                               f"layers have {hkv}")
    ks, vs = static_kv(prefixes)
    if rotary is not None:
        ks = [_rotate_by(rotary, k, P) for k in ks]
    kv = torch.stack([torch.stack(ks), torch.stack(vs)], dim=1)  # [layers, 2, Hkv, P, D]
    emb = kv.permute(3, 0, 1, 2, 4).reshape(P, len(prefixes) * 2 * hkv * d)
    cfg = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": P,
        "token_dim": hkv * d,
        "num_attention_heads": hkv,
        "num_layers": len(prefixes),
        "num_transformer_submodules": 1,
        "encoder_hidden_size": hkv * d,
        "prefix_projection": False,
        "inference_mode": True,
    }
    if h * d != getattr(mconf, "hidden_size", h * d) and getattr(mconf, "num_key_value_heads", None) is None:
        raise PeftInteropError("to_peft: cannot tell PEFT the head geometry of this model (hidden_size != "
                               "heads·head_dim)")
    return cfg, {"prompt_embeddings": emb.float()}


def _rotary_module(model: nn.Module, comp) -> nn.Module | None:
    """The language model's rotary embedding (``rotary_emb``), or None when it has none."""
    prefix = comp.root + "." if comp.root else ""
    found = [m for n, m in model.named_modules() if n.startswith(prefix) and n.rsplit(".", 1)[-1] == "rotary_emb"]
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def _rotate_by(rotary: nn.Module, k: torch.Tensor, offset: int) -> torch.Tensor:
    """Prefix keys ``[Hkv, P, D]`` rotated by position ``offset``: the keys PEFT needs for a
    ``positions="keep"`` prefix.

    Our prefix keys are never rotated and real tokens sit at 0..L-1, so a query at t scores a
    prefix key as ``(R_t q)·k``; PEFT places real tokens at P+t, giving ``(R_(P+t) q)·k'``. RoPE
    rotations compose (``R_(P+t) = R_t R_P``), so ``k' = R_P k`` gives every score, hence every
    output, unchanged; real-token keys move by the same P as the queries, which RoPE cancels.
    Uses the model's own rotary module (its frequencies and scaling) and the half-split rotation
    of Llama-style RoPE.
    """
    cos, sin = rotary(k, torch.full((1, 1), offset, dtype=torch.long, device=k.device))
    cos, sin = cos[0, 0].double(), sin[0, 0].double()  # rotate in float64: one rounding, at the end
    if cos.shape[-1] != k.shape[-1]:
        raise PeftInteropError(f"to_peft: the rotary embedding covers {cos.shape[-1]} of {k.shape[-1]} head "
                               "dimensions (partial RoPE); a positions='keep' prefix cannot be converted: train with "
                               "PrefixConfig(positions='shift') to export to PEFT")
    half = k.shape[-1] // 2
    k64 = k.double()
    rotated_half = torch.cat([-k64[..., half:], k64[..., :half]], dim=-1)
    return (k64 * cos + rotated_half * sin).to(k.dtype)


@torch.no_grad()
def static_kv(prefixes: list[tuple[str, LayerPrefix]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K and V ``[Hkv, P, D]`` each prefix computes in evaluation mode (no dropout), unchanged model."""
    ks, vs = [], []
    for _, prefix in prefixes:
        k, v = prefix.static_kv()
        ks.append(k.float().cpu().clone())
        vs.append(v.detach().float().cpu().clone())
    return ks, vs
