"""The architecture table: the one place that knows where things live in each model family.

For every ``model_type`` it maps each component (``"language"``, ``"vision"``, ...) to
the module path of that component, the regex of its transformer blocks, and, inside a
block, the attention modules that get prefixes, the default LoRA targets and the hook
points of bottleneck adapters.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .config import check_targets


@dataclass(frozen=True)
class Family:
    """Where things are inside one stack of transformer blocks.

    Paths inside a block are relative to the block (``"self_attn"``, ``"mlp.fc2"``).
    ``lora`` names are matched as path suffixes of linear layers inside ``scope``.
    ``ffn_in``/``ffn_out``: the module whose input is the feed-forward block's input, and
    the one whose output is the feed-forward block's output (before the residual add).
    """

    layers: str
    attention: tuple[str, ...]
    lora: tuple[str, ...]
    attn_out: str | None
    ffn_in: str | None
    ffn_out: str | None
    scope: tuple[str, ...] | None = None  # sub-paths of a block this component owns (None: all)
    # (module regex under the component root, argument) that receives position ids;
    # positions="shift" adds P there: (module regex, keyword name, positional index), since
    # models pass position ids by keyword or by position. None: nothing to shift.
    positions: tuple[str, str, int] | None = None


@dataclass(frozen=True)
class Component:
    """One component of a model: candidate root paths and its family."""

    roots: tuple[str, ...]
    family: Family | None = None
    delegate: str | None = None  # config attribute holding a sub-config whose table entry applies
    direct: tuple[str, ...] = ()  # linear layers targeted directly (projector): LoRA/Adapter only


_LLAMA = Family(
    layers=r"layers\.\d+",
    attention=("self_attn",),
    lora=("q_proj", "k_proj", "v_proj", "o_proj"),
    attn_out="self_attn.o_proj",
    ffn_in="mlp",
    ffn_out="mlp",
    positions=(r"rotary_emb", "position_ids", 1),
)
_OPT = Family(
    layers=r"layers\.\d+",
    attention=("self_attn",),
    lora=("q_proj", "k_proj", "v_proj", "out_proj"),
    attn_out="self_attn.out_proj",
    ffn_in="fc1",
    ffn_out="fc2",
    positions=(r"embed_positions", "position_ids", 2),
)
_GPT2 = Family(
    layers=r"h\.\d+",
    attention=("attn",),
    lora=("c_attn", "attn.c_proj"),
    attn_out="attn.c_proj",
    ffn_in="mlp",
    ffn_out="mlp",
    positions=(r"wpe", "input", 0),
)
_BERT = Family(
    layers=r"layer\.\d+",
    attention=("attention.self",),
    lora=("query", "key", "value", "attention.output.dense"),
    attn_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    positions=(r"embeddings\.position_embeddings", "input", 0),
)
_VIT = Family(  # transformers 5.x ViT: layers.N.attention.{q,k,v,o}_proj, layers.N.mlp.fc1/fc2
    layers=r"layers\.\d+",
    attention=("attention",),
    lora=("q_proj", "k_proj", "v_proj", "o_proj"),
    attn_out="attention.o_proj",
    ffn_in="mlp",
    ffn_out="mlp",
)
_CLIP = Family(
    layers=r"layers\.\d+",
    attention=("self_attn",),
    lora=("q_proj", "k_proj", "v_proj", "out_proj"),
    attn_out="self_attn.out_proj",
    ffn_in="mlp",
    ffn_out="mlp",
)
_T5_LORA = ("q", "k", "v", "o")
_T5_ENCODER = Family(
    layers=r"block\.\d+",
    attention=("layer.0.SelfAttention",),
    lora=_T5_LORA,
    attn_out="layer.0.SelfAttention.o",
    ffn_in="layer.1.DenseReluDense",
    ffn_out="layer.1.DenseReluDense",
)
_T5_DECODER = Family(
    layers=r"block\.\d+",
    attention=("layer.0.SelfAttention",),
    lora=_T5_LORA,
    attn_out="layer.0.SelfAttention.o",
    ffn_in="layer.2.DenseReluDense",
    ffn_out="layer.2.DenseReluDense",
    scope=("layer.0", "layer.2"),
)
_T5_CROSS = Family(
    layers=r"block\.\d+",
    attention=("layer.1.EncDecAttention",),
    lora=_T5_LORA,
    attn_out="layer.1.EncDecAttention.o",
    ffn_in=None,
    ffn_out=None,
    scope=("layer.1",),
)
_BLIP2_VISION = Family(
    layers=r"layers\.\d+",
    attention=("self_attn",),
    lora=("qkv", "self_attn.projection"),
    attn_out="self_attn.projection",
    ffn_in="mlp",
    ffn_out="mlp",
)
_QFORMER = Family(
    layers=r"layer\.\d+",
    attention=("attention.attention",),
    lora=("query", "key", "value", "attention.output.dense"),
    attn_out="attention.output.dense",
    ffn_in="intermediate_query.dense",
    ffn_out="output_query.dense",
    scope=("attention", "intermediate_query", "output_query"),
)

_PHI3 = replace(_LLAMA, lora=("qkv_proj", "o_proj"))  # fused q/k/v projection
_QWEN2_VL_VISION = Family(  # Qwen2-VL / Qwen2.5-VL ViT; attention runs per image (and per window in 2.5)
    layers=r"blocks\.\d+",
    attention=("attn",),
    lora=("qkv", "attn.proj"),
    attn_out="attn.proj",
    ffn_in="mlp",
    ffn_out="mlp",
)
_DAVIT = Family(  # Florence-2's DaViT: prefixes in the spatial (window) attention, not the channel attention
    layers=r"blocks\.\d+\.\d+",
    attention=("spatial_block.window_attn",),
    lora=("window_attn.qkv", "window_attn.proj"),
    attn_out="spatial_block.window_attn.proj",
    ffn_in="spatial_block.ffn",
    ffn_out="spatial_block.ffn",
)
_BART_SCOPE_DECODER = ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
_BART_ENCODER = Family(
    layers=r"layers\.\d+",
    attention=("self_attn",),
    lora=("q_proj", "k_proj", "v_proj", "out_proj"),
    attn_out="self_attn.out_proj",
    ffn_in="fc1",
    ffn_out="fc2",
)
_BART_DECODER = replace(_BART_ENCODER, scope=_BART_SCOPE_DECODER)
_BART_CROSS = Family(
    layers=r"layers\.\d+",
    attention=("encoder_attn",),
    lora=("q_proj", "k_proj", "v_proj", "out_proj"),
    attn_out="encoder_attn.out_proj",
    ffn_in=None,
    ffn_out=None,
    scope=("encoder_attn",),
)


def _projector(block: str, linears: tuple[str, ...], out: str, roots: tuple[str, ...] = ("model", "")) -> Component:
    """A multimodal projector as a one-block family: LoRA on ``linears``, a (sequential)
    adapter on ``out``'s output. No attention inside, so no prefix; ``ffn_in`` is None
    because input and output widths differ (parallel adapters do not apply)."""
    return Component(roots=roots, family=Family(layers=re.escape(block), attention=(), lora=linears,
                                                attn_out=None, ffn_in=None, ffn_out=out))


def _mm(vision: str, language: str, projector: Component | None, qformer: str | None = None) -> dict[str, Component]:
    """An image-text model whose vision tower, Q-Former and language model are looked up by
    their own sub-config's ``model_type`` (so LLaVA with a SigLIP tower or a Qwen2 LM just works)."""
    def roots(p):
        return (f"model.{p}", p)

    out = {"vision": Component(roots=roots(vision), delegate="vision_config"),
           "language": Component(roots=roots(language), delegate="text_config")}
    if qformer is not None:
        out["qformer"] = Component(roots=roots(qformer), delegate="qformer_config")
    if projector is not None:
        out["projector"] = projector
    return out


_LLAVA = _mm("vision_tower", "language_model",
             _projector("multi_modal_projector", ("linear_1", "linear_2"), "linear_2"))
_IDEFICS3 = _mm("vision_model", "text_model", _projector("connector", ("proj",), "modality_projection"))
_QWEN2_VL = _mm("visual", "language_model",
                _projector("merger", ("mlp.0", "mlp.2"), "mlp", roots=("model.visual", "visual")))

_CLIP_LIKE = {
    "language": Component(roots=("text_model",), family=_CLIP),
    "vision": Component(roots=("vision_model",), family=_CLIP),
}

ARCHITECTURES: dict[str, dict[str, Component]] = {
    "llama": {"language": Component(roots=("",), family=_LLAMA)},
    "mistral": {"language": Component(roots=("",), family=_LLAMA)},
    "qwen2": {"language": Component(roots=("",), family=_LLAMA)},
    "opt": {"language": Component(roots=("",), family=_OPT)},
    "gpt2": {"language": Component(roots=("",), family=_GPT2)},
    "bert": {"language": Component(roots=("",), family=_BERT)},
    "vit": {"vision": Component(roots=("",), family=_VIT)},
    "clip": _CLIP_LIKE,
    "clip_text_model": {"language": Component(roots=("",), family=_CLIP)},
    "clip_vision_model": {"vision": Component(roots=("",), family=_CLIP)},
    "siglip": _CLIP_LIKE,
    "siglip_text_model": {"language": Component(roots=("",), family=_CLIP)},
    "siglip_vision_model": {"vision": Component(roots=("",), family=_CLIP)},
    "t5": {
        "encoder": Component(roots=("encoder",), family=_T5_ENCODER),
        "decoder": Component(roots=("decoder",), family=_T5_DECODER),
        "cross": Component(roots=("decoder",), family=_T5_CROSS),
    },
    "blip-2": {},  # filled below (alias of blip_2)
    "blip_2": {
        "vision": Component(roots=("vision_model",), family=_BLIP2_VISION),
        "qformer": Component(roots=("qformer",), family=_QFORMER),
        "projector": Component(roots=("",), direct=("language_projection",)),
        "language": Component(roots=("language_model",), delegate="text_config"),
    },
}
ARCHITECTURES["blip-2"] = ARCHITECTURES["blip_2"]
_TEXT_LLAMA = {"language": Component(roots=("",), family=_LLAMA)}
ARCHITECTURES.update({
    # text families (also the language models of the LMMs below)
    "gemma": {"language": Component(roots=("",), family=_LLAMA)},
    "qwen3": _TEXT_LLAMA, "gemma2": _TEXT_LLAMA, "gemma3_text": _TEXT_LLAMA,
    # M-RoPE: positions="shift" adds P to all three (temporal, height, width) position rows
    "qwen2_vl_text": _TEXT_LLAMA, "qwen2_5_vl_text": _TEXT_LLAMA,
    "phi3": {"language": Component(roots=("",), family=_PHI3)},
    "bart": {
        "encoder": Component(roots=("encoder", "model.encoder"), family=_BART_ENCODER),
        "decoder": Component(roots=("decoder", "model.decoder"), family=_BART_DECODER),
        "cross": Component(roots=("decoder", "model.decoder"), family=_BART_CROSS),
    },
    # vision towers
    "instructblip_vision_model": {"vision": Component(roots=("",), family=_BLIP2_VISION)},
    "instructblip_qformer": {"qformer": Component(roots=("",), family=_QFORMER)},
    "idefics3_vision": {"vision": Component(roots=("",), family=_CLIP)},
    "smolvlm_vision": {"vision": Component(roots=("",), family=_CLIP)},
    "qwen2_vl": _QWEN2_VL, "qwen2_5_vl": _QWEN2_VL,
    "qwen2_vl_vision": {"vision": Component(roots=("",), family=_QWEN2_VL_VISION)},
    "qwen2_5_vl_vision": {"vision": Component(roots=("",), family=_QWEN2_VL_VISION)},
    "florence_vision": {"vision": Component(roots=("",), family=_DAVIT)},
    # image-text models
    "instructblip": {
        **_mm("vision_model", "language_model", None, qformer="qformer"),
        # a bare Linear: LoRA through `direct`, adapter on its own output (ffn_out "" = the block itself)
        "projector": Component(roots=("",), direct=("language_projection",), family=Family(
            layers="language_projection", attention=(), lora=(), attn_out=None, ffn_in=None, ffn_out="")),
    },
    "llava": _LLAVA, "llava_next": _LLAVA, "llava_onevision": _LLAVA,
    "idefics3": _IDEFICS3, "smolvlm": _IDEFICS3,
    "paligemma": _mm("vision_tower", "language_model", _projector("multi_modal_projector", ("linear",), "linear")),
    # Gemma 3's projector is a bare weight matrix (no nn.Linear), so it has no projector component.
    "gemma3": _mm("vision_tower", "language_model", None),
    "florence2": _mm("vision_tower", "language_model",
                     _projector("multi_modal_projector", ("image_projection",), "image_projection")),
})

# Components a name stands for when the model has no component of that exact name:
# an encoder-decoder language model's "language" is its encoder, decoder and cross-attention.
ALIASES = {"language": ("encoder", "decoder", "cross")}


@dataclass
class ResolvedComponent:
    """A component found in a concrete model: its root path and family."""

    name: str
    root: str
    family: Family | None
    direct: tuple[str, ...] = ()
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)
    alias_of: str | None = None  # set when reached through an alias ("language" → "cross")


def supported_model_types() -> list[str]:
    """Model types the table knows, for error messages and docs."""
    return sorted(k for k in ARCHITECTURES if k != "blip-2")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _table_for(config: Any, custom: dict[str, Any] | None, model: nn.Module | None = None) -> dict[str, Component]:
    if custom:
        return {"language": Component(roots=("",), family=family_from_targets(custom))}
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(_not_in_table(model_type, model))
    return ARCHITECTURES[model_type]


def _not_in_table(model_type: str | None, model: nn.Module | None) -> str:
    """Why a model the table lacks was refused, and the targets to pass, read off the model itself."""
    head = (f"model_type {model_type!r} is not in ptpeft_fast's architecture table (supported: "
            f"{', '.join(supported_model_types())})")
    found = suggest_targets(model) if model is not None else None
    if found is None:
        return (f"{head}; pass the targets by hand: PTPeftConfig(targets={{'layers': <regex of the blocks>, "
                "'attention': [<attention module inside a block>], 'lora': [<linear layers>]}})")
    targets, attention = found
    if routes_through_attention_interface(attention):
        return (f"{head}. Its attention ({type(attention).__name__}) goes through transformers' AttentionInterface, "
                f"so it can take a prefix: pass targets read off this model, PTPeftConfig(targets={targets!r})")
    return (f"{head}, and its attention ({type(attention).__name__}) does not go through transformers' "
            "AttentionInterface, so it cannot take a prefix: LoRA and adapters only, "
            f"PTPeftConfig(prefix=None, targets={targets!r})")


def suggest_targets(model: nn.Module) -> tuple[dict[str, Any], nn.Module] | None:
    """Hand-given ``targets`` read off a model's module names, and its first attention module.

    The blocks are the longest list of same-class modules; in the first block, the attention is the
    first module whose class name says so, its linear layers are the LoRA targets, and a child
    named or typed as an MLP is the feed-forward block. None when no such structure is found.
    """
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not lists:
        return None
    path, blocks = max(lists, key=lambda item: len(item[1]))
    block = blocks[0]
    rel, attention = next(((r, m) for r, m in block.named_modules() if r and "attention" in type(m).__name__.lower()),
                          (None, None))
    if attention is None:
        return None
    linear = sorted({r.rsplit(".", 1)[-1] for r, m in attention.named_modules()
                     if r and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")})
    targets: dict[str, Any] = {"layers": re.escape(path) + r"\.\d+", "attention": [rel], "lora": linear}
    ffn = next((r for r, m in block.named_children() if r in ("mlp", "feed_forward", "ffn")
                or type(m).__name__.lower().endswith("mlp")), None)
    if ffn is not None:
        targets["ffn_in"] = targets["ffn_out"] = ffn
    return targets, attention


def routes_through_attention_interface(attention: nn.Module) -> bool:
    """Whether an attention module's code dispatches through transformers' ``AttentionInterface``
    (read from its module's source, as transformers itself decides ``set_attn_implementation``)."""
    import inspect
    import sys

    try:
        source = inspect.getsource(sys.modules[type(attention).__module__])
    except (KeyError, OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def family_from_targets(t: dict[str, Any]) -> Family:
    """A :class:`Family` from hand-given target names (for models the table lacks)."""
    t = check_targets(t)

    def as_tuple(v):
        return (v,) if isinstance(v, str) else tuple(v)

    return Family(
        layers=t["layers"],
        attention=as_tuple(t["attention"]),
        lora=as_tuple(t.get("lora", ())),
        attn_out=t.get("attn_out"),
        ffn_in=t.get("ffn_in"),
        ffn_out=t.get("ffn_out"),
    )


def resolve_components(model: nn.Module, names: tuple[str, ...],
                       custom: dict[str, Any] | None = None) -> list[ResolvedComponent]:
    """Find the components ``names`` in ``model``; raise ``ValueError`` naming what is missing."""
    config = getattr(model, "config", None)
    table = _table_for(config, custom, model)
    modules = dict(model.named_modules())
    out: list[ResolvedComponent] = []
    for name in names:
        out.extend(_resolve_one(model, config, table, name, "", modules))
    return out


def _resolve_one(model, config, table, name, base, modules) -> list[ResolvedComponent]:
    if name not in table:
        if name in ALIASES and all(a in table for a in ALIASES[name]):
            return [replace(c, alias_of=name) for a in ALIASES[name]
                    for c in _resolve_one(model, config, table, a, base, modules)]
        raise ValueError(
            f"component {name!r} does not exist in model_type {getattr(config, 'model_type', None)!r}; "
            f"it has: {sorted(table)}"
        )
    comp = table[name]
    root = next((_join(base, r) for r in comp.roots if _join(base, r) in modules), None)
    if root is None:
        raise ValueError(f"component {name!r}: none of the module paths {comp.roots} exists in the model")
    if comp.delegate is not None:
        sub_config = getattr(config, comp.delegate)
        sub_table = _table_for(sub_config, None)
        return [c for c in _resolve_sub(model, sub_config, sub_table, name, root, modules)]
    resolved = ResolvedComponent(name=name, root=root, family=comp.family,
                                 direct=tuple(_join(root, d) for d in comp.direct))
    if comp.family is not None:
        pattern = re.compile(r"(^|\.)" + comp.family.layers + "$")
        prefix = root + "." if root else ""
        resolved.blocks = [
            (n, m) for n, m in modules.items() if n.startswith(prefix) and pattern.search(n[len(prefix):])
        ]
        if not resolved.blocks:
            raise ValueError(f"component {name!r}: no transformer blocks matching {comp.family.layers!r} "
                             f"under {root!r}")
    return [resolved]


def _resolve_sub(model, sub_config, sub_table, name, root, modules):
    if name in sub_table:
        return _resolve_one(model, sub_config, sub_table, name, root, modules)
    if name in ALIASES and all(a in sub_table for a in ALIASES[name]):
        return [replace(c, alias_of=name) for a in ALIASES[name]
                for c in _resolve_one(model, sub_config, sub_table, a, root, modules)]
    # a text model registered under another component name (e.g. its only component)
    if len(sub_table) == 1:
        only = next(iter(sub_table))
        return [replace(c, name=name) for c in _resolve_one(model, sub_config, sub_table, only, root, modules)]
    raise ValueError(f"component {name!r}: sub-model {getattr(sub_config, 'model_type', None)!r} "
                     f"has components {sorted(sub_table)}")


def iter_in_scope(block: nn.Module, family: Family) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of ``block`` (relative paths) inside the family's scope."""
    for rel, mod in block.named_modules():
        if not rel:
            continue
        if family.scope is None or any(rel == s or rel.startswith(s + ".") for s in family.scope):
            yield rel, mod


def attention_geometry(module: nn.Module) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head dim D) of an attention module.

    Attribute names differ per family; GQA/MQA models expose ``num_key_value_groups``.
    """
    head_dim = _first_attr(module, ("head_dim", "attention_head_size", "key_value_proj_dim"))
    heads = _first_attr(module, ("num_heads", "num_attention_heads", "n_heads"))
    config = getattr(module, "config", None)
    if heads is None and config is not None:
        heads = getattr(config, "num_attention_heads", None)
    width = _first_attr(module, ("embed_dim", "dim"))  # e.g. Florence-2's DaViT: per-stage width, no head_dim
    if head_dim is None and heads is not None and width is not None:
        head_dim = width // heads
    if head_dim is None and heads is not None and config is not None and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // heads
    if heads is None or head_dim is None:
        raise ValueError(f"cannot read the head count / head dim of {type(module).__name__}; pass targets by hand")
    groups = getattr(module, "num_key_value_groups", 1) or 1
    return int(heads), int(heads) // int(groups), int(head_dim)


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
