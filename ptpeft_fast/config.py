"""Configuration of a PT-PEFT setup: which prefix, LoRA and Adapter modules go where.

A section set to ``None`` is off. Every value is validated on construction, so a typo
fails before any model is touched, with the key and the allowed values named.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .op_names import ACTIVATIONS, BACKENDS

COMPONENTS = ("language", "vision", "qformer", "projector", "encoder", "decoder", "cross")
REPARAMS = ("mlp", "mlp-global", "none")
POSITIONS = ("keep", "shift")
ADAPTER_STYLES = ("pfeiffer", "houlsby", "parallel")
CONFIG_VERSION = 1


def lora_scaling(alpha: float, r: int) -> float:
    """The factor of LoRA's update ``W + scaling · B A``: ``alpha / r`` (the one place that says so)."""
    return alpha / r


def _components(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} must be a list of component names such as ['language'], got {value!r}")
    value = tuple(value)
    if not value:
        raise ValueError(f"{key} is empty; give at least one of {COMPONENTS}")
    for c in value:
        if c not in COMPONENTS:
            raise ValueError(f"{key}: unknown component {c!r}; allowed: {COMPONENTS}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _probability(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {allowed}")
    return value


@dataclass
class PrefixConfig:
    """Prefix tokens prepended to the keys and values of every patched attention layer.

    Args:
        num_tokens: prefix length P per layer.
        reparam: ``"mlp"`` (one embedding per layer through a shared K/V MLP, seed 2's
            deep-share), ``"mlp-global"`` (one MLP for all layers, Li & Liang / PEFT's
            ``prefix_projection``) or ``"none"`` (independent K and V parameters).
        hidden_size: hidden width of the reparameterisation MLP.
        dropout: dropout on the MLP output (training only).
        components: where prefixes go (``"language"``, ``"vision"``, ``"qformer"``, ...).
        positions: ``"keep"`` (real tokens keep positions 0..L-1) or ``"shift"`` (P..P+L-1,
            as PEFT does, so PEFT prefix checkpoints give identical outputs).
        init_std: standard deviation of the prefix embedding initialisation.
    """

    num_tokens: int = 10
    reparam: str = "mlp"
    hidden_size: int = 512
    dropout: float = 0.0
    components: tuple[str, ...] = ("language",)
    positions: str = "keep"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.num_tokens = _positive_int(self.num_tokens, "prefix.num_tokens")
        self.reparam = _choice(self.reparam, "prefix.reparam", REPARAMS)
        self.hidden_size = _positive_int(self.hidden_size, "prefix.hidden_size")
        self.dropout = _probability(self.dropout, "prefix.dropout")
        self.components = _components(self.components, "prefix.components")
        self.positions = _choice(self.positions, "prefix.positions", POSITIONS)
        if not (isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"prefix.init_std must be a positive finite number, got {self.init_std!r}")


@dataclass
class LoraConfig:
    """Low-rank updates W + (alpha/r)·B·A on the target linear layers.

    ``targets=None`` takes the architecture table's default (the attention projections).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    components: tuple[str, ...] = ("language",)

    def __post_init__(self) -> None:
        self.r = _positive_int(self.r, "lora.r")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha <= 0):
            raise ValueError(f"lora.alpha must be a positive finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        self.dropout = _probability(self.dropout, "lora.dropout")
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = (self.targets,)
            if not isinstance(self.targets, (list, tuple)):
                raise ValueError(f"lora.targets must be a list of module names such as ['q_proj', 'v_proj'], "
                                 f"got {self.targets!r}")
            self.targets = tuple(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")
        self.components = _components(self.components, "lora.components")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r)


@dataclass
class AdapterConfig:
    """Bottleneck adapters: x + up(act(down(x))).

    ``style``: ``"pfeiffer"`` (after the feed-forward block), ``"houlsby"`` (after attention
    and after the feed-forward block), ``"parallel"`` (beside the feed-forward block).
    """

    bottleneck: int = 64
    style: str = "pfeiffer"
    activation: str = "relu"
    components: tuple[str, ...] = ("language",)

    def __post_init__(self) -> None:
        self.bottleneck = _positive_int(self.bottleneck, "adapter.bottleneck")
        self.style = _choice(self.style, "adapter.style", ADAPTER_STYLES)
        self.activation = _choice(self.activation, "adapter.activation", ACTIVATIONS)
        self.components = _components(self.components, "adapter.components")


_SECTIONS = {"prefix": PrefixConfig, "lora": LoraConfig, "adapter": AdapterConfig}


@dataclass
class PTPeftConfig:
    r"""Everything ``ptpeft_fast.patch`` needs. Sections set to ``None`` are off.

    ``freeze_prefix`` keeps the prefix fixed in stage 2 (the paper trains it: default False).
    ``fused_loss``: in training mode with ``labels``, a causal LM's loss comes from its last hidden
    state through :func:`ptpeft_fast.ops.linear_cross_entropy`, without the logits (the output's
    ``logits`` is then None; :mod:`ptpeft_fast.fused_loss`); False keeps transformers' own loss.
    ``backend``: ``"auto"`` (each op's dispatch table chooses), or one implementation name
    (``"torch"``: the reference everywhere; ``"triton"``; ...) that every op which has it runs while
    the others choose as usual (``ptpeft_fast.ops.backend_names()`` lists them).
    ``targets`` overrides the architecture table for models it does not list:
    ``{"layers": regex of the blocks, "attention": [paths in a block], "lora": [names],
    "attn_out": path, "ffn_in": path, "ffn_out": path}`` (``layers`` and ``attention`` required),
    for example ``{"layers": r"transformer\.h\.\d+", "attention": ["self_attention"],
    "lora": ["query_key_value"]}``; ``patch`` on a model the table lacks suggests one from the
    model's own module names.

    A section may be given as a mapping (``prefix={"num_tokens": 10}``): it is converted to its
    section class here, with the same checks as :meth:`from_dict`.
    """

    prefix: PrefixConfig | None = field(default_factory=PrefixConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    adapter: AdapterConfig | None = None
    freeze_prefix: bool = False
    backend: str = "auto"
    targets: dict[str, Any] | None = None
    fused_loss: bool = True

    def __post_init__(self) -> None:
        for name in _SECTIONS:
            setattr(self, name, _section(name, getattr(self, name)))
        for key in ("freeze_prefix", "fused_loss"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        self.backend = _choice(self.backend, "backend", BACKENDS)
        self.targets = check_targets(self.targets)
        if self.prefix is None and self.lora is None and self.adapter is None:
            raise ValueError("all of prefix, lora and adapter are None: nothing to patch; enable at least one section")

    # ---- (de)serialisation -------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PTPeftConfig":
        """Build from a plain mapping; a missing section takes its default, ``None`` turns it off."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        check_version(d, "config")
        d.pop("version", None)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)  # sections given as mappings are converted (and checked) by __post_init__

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        for section in _SECTIONS:
            if out[section] is not None:
                out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in out[section].items()}
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "PTPeftConfig":
        d = json.loads(Path(path).read_text())
        check_version(d, path)
        return cls.from_dict(d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PTPeftConfig":
        import yaml

        d = yaml.safe_load(Path(path).read_text()) or {}
        check_version(d, path)
        return cls.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _section(name: str, value: Any) -> Any:
    """A config section as its class: None (off), an instance, or a mapping of its fields."""
    section_cls = _SECTIONS[name]
    if value is None or isinstance(value, section_cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a {section_cls.__name__}, a mapping of its fields or None, got {value!r}")
    allowed = {f.name for f in dataclasses.fields(section_cls)}
    bad = set(value) - allowed
    if bad:
        raise ValueError(f"unknown key(s) {sorted(f'{name}.{k}' for k in bad)}; allowed in {name}: {sorted(allowed)}")
    return section_cls(**value)


#: Keys of hand-given ``targets`` (models the architecture table lacks).
TARGET_KEYS = ("layers", "attention", "lora", "attn_out", "ffn_in", "ffn_out")


def check_targets(targets: Any) -> dict[str, Any] | None:
    """Hand-given ``targets`` checked: a mapping of :data:`TARGET_KEYS` with ``layers`` and ``attention``."""
    if targets is None:
        return None
    example = ("{'layers': r'transformer\\.h\\.\\d+', 'attention': ['self_attention'], "
               "'lora': ['query_key_value']}")
    if not isinstance(targets, dict):
        raise ValueError(f"targets must be a mapping such as {example}, got {targets!r}")
    unknown = set(targets) - set(TARGET_KEYS)
    if unknown:
        raise ValueError(f"targets: unknown key(s) {sorted(unknown)}; allowed: {list(TARGET_KEYS)}")
    if "layers" not in targets or "attention" not in targets:
        raise ValueError("targets needs 'layers' (a regex of the model's blocks) and 'attention' (module paths inside "
                         f"a block), e.g. {example}")
    return dict(targets)


def check_version(d: Any, path: Any) -> None:
    """Refuse a config whose ``version`` this ptpeft_fast does not read (absent: the current one)."""
    if not isinstance(d, dict) or "version" not in d:
        return
    v = d["version"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{path}: version must be a positive integer (this ptpeft_fast writes {CONFIG_VERSION}), "
                         f"got {v!r}")
    if v > CONFIG_VERSION:
        raise ValueError(f"{path}: config version {v} is newer than this ptpeft_fast understands "
                         f"(it reads version {CONFIG_VERSION}); upgrade ptpeft_fast")
