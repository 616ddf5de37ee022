"""``patch(model, config)``: add prefixes, LoRA and adapters to a Hugging Face model in place."""
from __future__ import annotations

import contextlib
import copy
import re
import warnings

import torch
from torch import nn

from . import attention, fused_loss, ops, optimizer_guard, packing
from .architectures import ResolvedComponent, attention_geometry, iter_in_scope, resolve_components
from .call_args import ArgReader
from .config import PTPeftConfig
from .patch_state import PatchState, get_state
from .quantized import keep_differentiable, quantized_base
from .stages import set_stage
from .tuners.adapter import BottleneckAdapter, hook_parallel, hook_sequential
from .tuners.lora import (
    SUPPORTED_LINEAR,
    LoraWeights,
    attach_lora,
    features,
    is_conv1d,
    unmerge_lora,
    unsupported_linear,
)
from .tuners.prefix import GlobalPrefixMLP, LayerPrefix


def _param_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    # a quantized layer's weight is integer storage: float32 on its device
    return torch.float32, next((p.device for p in module.parameters()), torch.device("cpu"))


def _check_not_wrapped(model: nn.Module) -> None:
    if hasattr(model, "_ptpeft"):
        raise ValueError("this model is already patched by ptpeft_fast; patch a fresh model, or use ptpeft_fast.load "
                         "to restore weights")
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise ValueError(
            "this model is wrapped by PEFT; patch the base model instead (model.get_base_model() after "
            "merge_and_unload()), or load a PEFT checkpoint with ptpeft_fast.from_peft"
        )


def patch(model: nn.Module, config: PTPeftConfig | dict | None = None) -> nn.Module:
    """Add PT-PEFT modules to ``model`` in place and return it.

    Prefixes go in the attention layers of ``config.prefix.components`` (sized by the
    layer's key/value heads), LoRA on the target linear layers, adapters on the
    feed-forward (and, for Houlsby, attention) outputs. Attention runs through
    transformers' ``AttentionInterface`` (registered as ``"ptpeft"``). The model is left
    in stage ``"prefix"`` when it has a prefix, else ``"peft"`` (see :func:`set_stage`).
    On a bitsandbytes 4-bit or 8-bit base, LoRA adds its term to each quantized layer's own
    output (:func:`ptpeft_fast.ops.lora_branch`).
    """
    if config is None:
        config = PTPeftConfig()
    elif isinstance(config, dict):
        config = PTPeftConfig.from_dict(config)
    _check_not_wrapped(model)
    config = copy.deepcopy(config)
    state = PatchState(config=config)
    modules = dict(model.named_modules())
    try:
        if config.prefix is not None:
            _add_prefixes(model, config, state, modules)
        if config.lora is not None:
            _add_lora(model, config, state, modules)
        if config.adapter is not None:
            _add_adapters(model, config, state, modules)
    except Exception:
        _undo(model, state)
        raise
    ops.prepare()  # build the extension, import the kernel packages: nothing of that is traced later
    keep_differentiable(model)  # a bitsandbytes 4-bit base: no gradient-less CPU inference layout
    if state.prefix_layers:
        name = attention.register()
        state.previous_attn_implementation = getattr(model.config, "_attn_implementation", None)
        try:
            set_attention_implementation(model, name, state.prefix_layers)
        except Exception:
            _undo(model, state)
            if state.previous_attn_implementation is not None:
                with contextlib.suppress(Exception):
                    set_attention_implementation(model, state.previous_attn_implementation, state.prefix_layers)
            raise
        # after the positions hooks: a packed row's restarting position ids are the user's
        state.hooks += packing.install(model, state.packing_root)
    check = _mask_check(model)
    if check is not None:
        state.hooks.append(check)
    if config.fused_loss:
        state.hooks += fused_loss.install(model, state)
    model._ptpeft = state
    set_stage(model, "prefix" if state.prefix_layers else "peft")
    optimizer_guard.watch(model)
    return model


def _mask_check(model: nn.Module):
    """Refuse an ``attention_mask`` that does not fit the tokens (another batch size or length) at the
    model's forward, with the fix, before any layer runs: inside the model it surfaced as a raw
    "size of tensor a (13) must match ..." or a shape error of the attention op."""
    try:
        call = ArgReader(model.forward)
    except (TypeError, ValueError):
        return None
    if not call.has("attention_mask"):
        return None

    def hook(_module, args, kwargs):
        mask = call.get(args, kwargs, "attention_mask")
        ids = call.get(args, kwargs, "input_ids")
        tokens = ids if ids is not None else call.get(args, kwargs, "inputs_embeds")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not isinstance(tokens, torch.Tensor) \
                or tokens.dim() < 2:
            return None
        cached = call.get(args, kwargs, "past_key_values") is not None or kwargs.get("cache") is not None
        # with a KV cache (decode steps) the mask also covers the cached tokens: at least as long
        fits = mask.shape[0] == tokens.shape[0] and (
            mask.shape[1] >= tokens.shape[1] if cached else mask.shape[1] == tokens.shape[1])
        if not fits:
            name = "input_ids" if ids is not None else "inputs_embeds"
            raise ValueError(
                f"attention_mask has shape {list(mask.shape)} but {name} has {list(tokens.shape[:2])} (batch, tokens): "
                "the mask needs one entry per token of each row (1 = real token, 0 = padding); build both in one "
                "tokenizer call, e.g. tokenizer(texts, padding=True, return_tensors='pt')")
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def set_attention_implementation(model: nn.Module, name: str, attention_paths=()) -> None:
    """``model.set_attn_implementation(name)``, and the same on the configs of the attention layers
    at ``attention_paths`` where that did not reach them.

    Some models copy their config into sub-models (T5's encoder and decoder stacks); transformers
    5.17 does not update those copies, so the layers kept their attention and a T5 prefix did
    nothing. Each layer reads ``self.config._attn_implementation``: it is set there directly.
    """
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(f"{type(model).__name__} has no set_attn_implementation: is it a transformers 5 model?")
    setter(name)
    current = getattr(getattr(model, "config", None), "_attn_implementation", name)
    if current != name:  # transformers only warns when a model keeps its own attention code (Falcon)
        raise ValueError(
            f"{type(model).__name__} cannot take a prefix: its attention does not go through transformers' "
            f"AttentionInterface (after set_attn_implementation({name!r}) it still uses {current!r}), so a "
            "prefix would never act. Use LoRA or adapters only (prefix: null), or a model class that supports "
            "the attention interface")
    for path in attention_paths:
        config = getattr(model.get_submodule(path), "config", None)
        if config is not None and getattr(config, "_attn_implementation", name) != name:
            config._attn_implementation = name


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every PT-PEFT module from a patched ``model`` (merged LoRA is subtracted from the base
    weights first) and restore its attention implementation; returns the plain model."""
    state = get_state(model)
    for layer in state.lora_layers.values():
        unmerge_lora(layer)
    _undo(model, state)
    if state.prefix_layers:
        set_attention_implementation(model, state.previous_attn_implementation or "sdpa", state.prefix_layers)
    del model._ptpeft
    optimizer_guard.unwatch(model)
    return model


def _undo(model: nn.Module, state: PatchState) -> None:
    """Best-effort removal of what a failed ``patch`` added, so the model is left as it was."""
    for h in state.hooks:
        h.remove()
    for layer in state.lora_layers.values():
        name = layer._ptpeft_lora
        delattr(layer, name)
        layer.__class__ = layer._ptpeft_base_class
        del layer._ptpeft_lora, layer._ptpeft_backend
    for mod in model.modules():
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (LayerPrefix, GlobalPrefixMLP, BottleneckAdapter)):
                delattr(mod, child_name)
        for attr in ("_ptpeft_prefix", "_ptpeft_backend"):
            if attr in mod.__dict__:
                delattr(mod, attr)


def _components_of(model, names, config) -> list[ResolvedComponent]:
    return resolve_components(model, tuple(names), config.targets)


def _add_prefixes(model, config: PTPeftConfig, state: PatchState, modules) -> None:
    pc = config.prefix
    for comp in _components_of(model, pc.components, config):
        layers = [] if comp.family is None else [
            (f"{bname}.{rel}", block.get_submodule(rel))
            for bname, block in comp.blocks for rel in comp.family.attention]
        if not layers:
            raise ValueError(f"component {comp.name!r} has no attention layers, so it takes no prefix "
                             "(it can take LoRA or an adapter); remove it from prefix.components")
        child = f"prefix_{comp.name}"
        geometry = [attention_geometry(m) for _, m in layers]
        dtype, device = _param_dtype_device(layers[0][1])
        shared = None
        if pc.reparam == "mlp-global":
            if len(set(geometry)) != 1:
                raise ValueError("prefix.reparam='mlp-global' needs equal head geometry in every layer of "
                                 f"{comp.name!r}")
            h, hkv, d = geometry[0]
            shared = GlobalPrefixMLP(len(layers), pc.num_tokens, hkv, d, h * d, pc.hidden_size, pc.dropout,
                                     pc.init_std, dtype, device)
            root = model.get_submodule(comp.root) if comp.root else model
            root.add_module(child, shared)
        for index, ((path, module), (h, hkv, d)) in enumerate(zip(layers, geometry, strict=True)):
            if hasattr(module, "_ptpeft_prefix"):
                raise ValueError(f"{path} already has a prefix ({module._ptpeft_prefix}); components overlap")
            prefix = LayerPrefix(pc.reparam, pc.num_tokens, hkv, d, h * d, pc.hidden_size, pc.dropout, pc.init_std,
                                 dtype, device, shared=shared, index=index)
            module.add_module(child, prefix)
            module._ptpeft_prefix = child
            module._ptpeft_backend = ops.backend_for("prefix_attention", config.backend)
            state.prefix_layers[path] = prefix
        # also for hand-given targets (no `positions` entry): whatever the model's position scheme, a
        # left-padded row's real tokens keep positions 0..L-1 where its forward takes position_ids
        if comp.name == "language":
            state.packing_root = model.get_submodule(comp.root) if comp.root else model
        hook = _positions_from_mask(model, comp)
        if hook is not None:
            state.hooks.append(hook)
        if comp.family.positions is not None and pc.positions == "shift":
            state.hooks.append(_shift_positions(model, comp, pc.num_tokens))


def _positions_from_mask(model, comp: ResolvedComponent):
    """Real tokens of a left-padded row keep positions 0..L-1 (design §2), as ``generate`` gives them.

    Prefix keys are not rotated, so unlike plain RoPE attention the result depends on absolute
    positions: without this a left-padded training batch (no ``position_ids``) would place its
    tokens differently from generation. Fills missing ``position_ids`` from the attention mask.
    """
    root = model.get_submodule(comp.root) if comp.root else model
    try:
        call = ArgReader(root.forward)
    except (TypeError, ValueError):
        return None
    if not call.has("position_ids", "attention_mask"):
        return None

    def hook(_module, args, kwargs):
        if model._ptpeft.disabled:
            return None
        mask = call.get(args, kwargs, "attention_mask")
        # no check "is anything padded?": it would be a data-dependent branch that breaks a compiled
        # graph; an unpadded mask gives the default positions anyway
        if call.get(args, kwargs, "position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        tokens = call.get(args, kwargs, "input_ids")
        if tokens is None:
            tokens = call.get(args, kwargs, "inputs_embeds")
        if tokens is None:
            return None
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -tokens.shape[1]:]
        return call.replaced(args, kwargs, position_ids=positions)

    return root.register_forward_pre_hook(hook, with_kwargs=True)


def _shift_positions(model, comp: ResolvedComponent, num_tokens: int):
    """Give real tokens positions P..P+L-1 (PEFT's convention) by offsetting the position ids."""
    pattern, name, index = comp.family.positions
    prefix = comp.root + "." if comp.root else ""
    regex = re.compile(r"(^|\.)" + pattern + "$")
    found = [m for n, m in model.named_modules() if n.startswith(prefix) and regex.search(n[len(prefix):])]
    if len(found) != 1:
        raise ValueError(f"positions='shift': expected one position module {pattern!r} in {comp.name!r}, found "
                         f"{len(found)}")
    table = found[0].num_embeddings if isinstance(found[0], nn.Embedding) else None
    if table is not None and num_tokens >= table:
        raise ValueError(f"prefix.num_tokens={num_tokens} with positions='shift' needs more positions than the model "
                         f"has: real tokens take positions {num_tokens}..{num_tokens}+L-1, and {comp.name!r} has a "
                         f"table of {table}. Use positions='keep', or at most {table - 1} prefix tokens "
                         f"(P + L <= {table})")

    def hook(_module, args, kwargs):
        if model._ptpeft.disabled:
            return None
        if kwargs.get(name) is not None:
            ids = kwargs[name]
            kwargs = {**kwargs, name: ids + num_tokens}
        elif len(args) > index and args[index] is not None:
            ids = args[index]
            args = args[:index] + (ids + num_tokens,) + args[index + 1:]
        else:
            raise RuntimeError(f"positions='shift': {pattern} was called without position ids")
        if table is not None and ids.shape[-1] + num_tokens > table:  # shapes only: no data-dependent branch
            raise ValueError(f"{ids.shape[-1]} tokens after {num_tokens} prefix positions exceed the model's "
                             f"{table} positions (positions='shift'); shorten the input to {table - num_tokens} tokens")
        return args, kwargs

    return found[0].register_forward_pre_hook(hook, with_kwargs=True)


def _matches(rel: str, targets) -> bool:
    return any(rel == t or rel.endswith("." + t) for t in targets)


def _refuse_linear(path: str, reason: str) -> None:
    raise ValueError(f"LoRA target {path} cannot take LoRA: {reason}. Supported: {SUPPORTED_LINEAR}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


_OURS = (LayerPrefix, GlobalPrefixMLP, LoraWeights, BottleneckAdapter)


def _inside_ours(block: nn.Module) -> set[int]:
    """ids of the modules of ``block`` that belong to PT-PEFT modules already added (a prefix's MLP):
    never LoRA targets, never listed as the model's layers."""
    return {id(m) for mod in block.modules() if isinstance(mod, _OURS) for m in mod.modules()}


def _add_lora(model, config: PTPeftConfig, state: PatchState, modules) -> None:
    lc = config.lora
    # names the user gave (lora.targets, or a hand-given targets["lora"]): each must match something
    given = tuple(lc.targets or (config.targets or {}).get("lora") or ())
    matched: set[str] = set()
    linear_names: set[str] = set()
    for comp in _components_of(model, lc.components, config):
        targets = lc.targets
        found: list[tuple[str, nn.Module]] = []
        if comp.direct:
            found += [(p, modules[p]) for p in comp.direct]
        if comp.family is not None:
            targets = targets or comp.family.lora
            for bname, block in comp.blocks:
                ours = _inside_ours(block)
                for rel, m in iter_in_scope(block, comp.family):
                    if id(m) in ours:
                        continue
                    if not _is_linear(m):
                        # a quantized layer that is no nn.Linear (HQQ, GPTQ/AWQ) named as a target
                        if not list(m.children()) and any(_matches(rel, (t,)) for t in (targets or ())):
                            _refuse_linear(f"{bname}.{rel}", unsupported_linear(m)
                                           or f"{type(m).__name__} is not a linear layer")
                        continue
                    linear_names.add(rel.split(".")[-1])
                    hits = [t for t in targets if _matches(rel, (t,))]
                    if hits:
                        matched.update(hits)
                        found.append((f"{bname}.{rel}", m))
        if not found:
            names = sorted({rel.split(".")[-1] for _, b in comp.blocks
                            for rel, m in b.named_modules() if _is_linear(m) and id(m) not in _inside_ours(b)})
            raise ValueError(f"lora.targets {list(targets or ())} match no linear layer in component {comp.name!r}; "
                             f"its linear layers are named: {names}")
        for path, layer in found:
            if not _is_linear(layer):
                raise ValueError(f"LoRA target {path} is a {type(layer).__name__}, not a linear layer")
            reason = unsupported_linear(layer)
            if reason is not None:
                _refuse_linear(path, reason)
            if path in state.lora_layers:
                continue
            dtype, device = _param_dtype_device(layer)
            fin, fout = features(layer)
            op = "lora_branch" if quantized_base(layer) is not None else "lora_linear"
            attach_lora(layer, f"lora_{comp.name}", LoraWeights(fin, fout, lc.r, lc.alpha, lc.dropout, dtype, device),
                        ops.backend_for(op, config.backend))
            state.lora_layers[path] = layer
    unmatched = [t for t in given if t not in matched and linear_names]
    if unmatched:
        raise ValueError(f"lora.targets {unmatched} match no linear layer in components {list(lc.components)}; "
                         f"their linear layers are named: {sorted(linear_names)}")


def _out_features(module: nn.Module) -> int:
    if _is_linear(module):
        return features(module)[1]
    linears = [m for m in module.modules() if _is_linear(m)]
    if not linears:
        raise ValueError(f"cannot tell the width of {type(module).__name__} for an adapter")
    return features(linears[-1])[1]


def _add_adapters(model, config: PTPeftConfig, state: PatchState, modules) -> None:
    ac = config.adapter
    warned: set[int] = set()
    for comp in _components_of(model, ac.components, config):
        fam = comp.family
        has_ffn = fam is not None and fam.ffn_out is not None
        has_attn = fam is not None and fam.attn_out is not None and ac.style == "houlsby"
        if not (has_ffn or has_attn):
            if comp.alias_of is not None:
                continue  # e.g. T5 cross-attention under "language": no feed-forward block of its own
            raise ValueError(f"component {comp.name!r} has no feed-forward block for a {ac.style} adapter")
        if ac.style == "parallel" and has_ffn and fam.ffn_in is None:
            raise ValueError(f"component {comp.name!r} changes width between input and output, so a parallel "
                             "adapter cannot sit beside it; use adapter.style='pfeiffer' or 'houlsby' there")
        for bname, block in comp.blocks:
            points = []
            if has_ffn:
                points.append(("ffn", fam.ffn_in, block.get_submodule(fam.ffn_out)))
            if has_attn:
                points.append(("attn", None, block.get_submodule(fam.attn_out)))
            for kind, ffn_in_path, target in points:
                dtype, device = _param_dtype_device(target)
                width = _out_features(target)
                if ac.bottleneck >= width and width not in warned:
                    warned.add(width)
                    warnings.warn(f"adapter.bottleneck={ac.bottleneck} is not smaller than the hidden size {width} of "
                                  f"{comp.name!r}: the adapter is no bottleneck and trains more parameters than the "
                                  f"layer it adapts; a value well below {width} (e.g. {max(1, width // 8)}) is usual",
                                  stacklevel=3)
                adapter = BottleneckAdapter(width, ac.bottleneck, ac.activation, dtype, device)
                adapter.backend = ops.backend_for("adapter", config.backend)
                child = f"adapter_{comp.name}_{kind}"
                block.add_module(child, adapter)
                state.adapters[f"{bname}.{child}"] = adapter
                if ac.style == "parallel":
                    state.hooks += hook_parallel(block.get_submodule(ffn_in_path), target, adapter)
                else:
                    state.hooks += hook_sequential(target, adapter)
