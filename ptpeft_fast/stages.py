"""Two-stage control: which parameters train in which stage (design §1)."""
from __future__ import annotations

from torch import nn

from .patch_state import GROUPS, get_state
from .tuners.adapter import BottleneckAdapter
from .tuners.lora import LoraWeights, lora_of
from .tuners.prefix import GlobalPrefixMLP, LayerPrefix

STAGES = ("prefix", "peft", "full", "eval")
_KIND = ((LayerPrefix, "prefix"), (GlobalPrefixMLP, "prefix"), (LoraWeights, "lora"), (BottleneckAdapter, "adapter"))


def parameter_groups(model: nn.Module) -> dict[str, str]:
    """Map every parameter name to its group: prefix, lora, adapter, extra or base."""
    state = get_state(model)
    groups: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        group = next((g for cls, g in _KIND if isinstance(mod, cls)), None)
        if group is None:
            continue
        for p_name, _ in mod.named_parameters():
            groups[f"{mod_name}.{p_name}" if mod_name else p_name] = group
    for name, _ in model.named_parameters():
        if name not in groups:
            extra = any(name == e or name.startswith(e + ".") for e in state.extra_trainable)
            groups[name] = "extra" if extra else "base"
    return groups


def set_stage(model: nn.Module, stage: str) -> nn.Module:
    """Set ``requires_grad`` for ``stage`` and return the model.

    - ``"prefix"``: only the prefix trains (stage 1).
    - ``"peft"``: LoRA and adapters train; the prefix too unless ``config.freeze_prefix``.
    - ``"full"``: every base weight, LoRA and adapter trains; the prefix unless frozen.
    - ``"eval"``: nothing trains and the model is put in eval mode.
    Parameters marked with :func:`mark_trainable` (e.g. a task head) train in every
    training stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")
    state = get_state(model)
    if stage in ("peft", "full") and state.lora_layers:
        if any(lora_of(layer).merged for layer in state.lora_layers.values()):
            raise ValueError(f"set_stage(model, {stage!r}): the LoRA update is merged into the base weights "
                             "(ptpeft_fast.merge), so its factors would get no gradient; call "
                             "ptpeft_fast.unmerge(model) first")
    freeze_prefix = state.config.freeze_prefix
    train = {
        "prefix": {"prefix", "extra"},
        "peft": {"lora", "adapter", "extra"} | (set() if freeze_prefix else {"prefix"}),
        "full": {"base", "lora", "adapter", "extra"} | (set() if freeze_prefix else {"prefix"}),
        "eval": set(),
    }[stage]
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        p.requires_grad_(groups[name] in train)
    model.train(stage != "eval")
    for prefix in state.prefix_layers.values():
        prefix._cache = None  # a stage change may follow updates the cache key cannot see (FSDP re-gathers in place)
    state.stage = stage
    state.stage_version += 1
    return model


def mark_trainable(model: nn.Module, *module_names: str) -> None:
    """Let the parameters under ``module_names`` (e.g. ``"classifier"``) train in every stage."""
    state = get_state(model)
    known = dict(model.named_modules())
    for n in module_names:
        if n not in known:
            raise ValueError(f"mark_trainable: no module named {n!r} in the model")
        state.extra_trainable.append(n)
    if state.stage is not None:
        set_stage(model, state.stage)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Number of parameters that train in the current stage (``requires_grad``), per group (prefix,
    lora, adapter, extra, base) and ``total``. A model in stage ``"eval"`` (what :func:`ptpeft_fast.load`
    returns) trains nothing, so every count is 0; :func:`present_parameters` counts what it holds."""
    return _count(model, trainable_only=True)


def present_parameters(model: nn.Module) -> dict[str, int]:
    """Number of parameters the model holds, whatever the stage, per group and ``total``."""
    return _count(model, trainable_only=False)


def _count(model: nn.Module, trainable_only: bool) -> dict[str, int]:
    counts = {g: 0 for g in GROUPS}
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            counts[groups[name]] += p.numel()
    counts["total"] = sum(counts[g] for g in GROUPS)
    return counts
