"""Model-family coverage (issue 6): tiny, randomly initialised models of every family in the architecture
table's coverage issue, built from configs (nothing is downloaded), plus batched left-padded inputs for them.

Each :class:`Spec` knows how to build its model, which components it has (and which PEFT
methods apply to each), and how to make inputs, including image inputs with the right
number of image placeholder tokens, so the multimodal paths run for real.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers as T

import ptpeft_fast as pf
from ptpeft_fast import attention as pf_attention
from ptpeft_fast.stages import parameter_groups

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
IMG, AUX1, AUX2, AUX3 = 120, 121, 122, 123  # image placeholder and begin/end-of-image style tokens
# never generated in the tests: a generated <image> would be an image slot
SPECIAL = (PAD, BOS, EOS, IMG, AUX1, AUX2, AUX3)

# dropout is off everywhere (the defaults already are for these families) so runs repeat exactly
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS, tie_word_embeddings=False)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=16, patch_size=4)
SIGLIP_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=16, patch_size=4)

ALL = ("prefix", "lora", "adapter")
NO_PREFIX = ("lora", "adapter")


@dataclass
class Spec:
    """One architecture under test."""

    id: str  # test id and table row key
    name: str  # human name for the docs table
    model_type: str
    make_config: Callable[[], Any]
    model_class: Any
    components: dict[str, tuple[str, ...]]  # component -> PEFT methods that apply
    image_tokens: int = 0  # placeholder tokens per image (0: text only)
    layout: str = "text"  # how inputs are laid out, see make_inputs
    sliding: bool = False  # has sliding-window layers
    softcap: bool = False  # attention logit soft-capping goes through the interface
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_decoder(self) -> bool:
        return self.layout == "florence2"

    @property
    def multimodal(self) -> bool:
        return self.layout not in ("text",)


def _text(cls, **over):
    return lambda: cls(**{**TEXT, **over})


def _llava_cfg():
    return T.LlavaConfig(text_config=dict(model_type="llama", **TEXT), vision_config=CLIP, image_token_index=IMG,
                         vision_feature_layer=-1)


def _llava_next_cfg():
    return T.LlavaNextConfig(text_config=dict(model_type="llama", **TEXT), vision_config=CLIP, image_token_index=IMG,
                             image_grid_pinpoints=[[16, 16], [16, 32]], vision_feature_layer=-1)


def _llava_ov_cfg():
    return T.LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **TEXT), vision_config=SIGLIP,
                                  image_token_index=IMG, video_token_index=AUX1,
                                  image_grid_pinpoints=[[16, 16], [16, 32]], vision_feature_layer=-1)


def _instructblip_cfg():
    return T.InstructBlipConfig(
        # the vision config defaults to initializer_range=1e-10 (checkpoints overwrite it): from scratch the
        # tower's output was ~1e-5 and new pixels moved the logits by 8e-8, so no vision test saw anything
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4, initializer_range=0.02),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=VOCAB, pad_token_id=PAD),
        text_config=dict(model_type="llama", **TEXT), num_query_tokens=4, image_token_index=IMG)


def _idefics3_cfg(cls):
    return lambda: cls(vision_config=dict(SIGLIP_LIKE), text_config=dict(model_type="llama", **TEXT),
                       scale_factor=2, image_token_id=IMG, pad_token_id=PAD)


def _qwen2_vl_cfg():
    return T.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        text_config=dict(**TEXT, rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2])),
        image_token_id=IMG, video_token_id=AUX1, vision_start_token_id=AUX2, vision_end_token_id=AUX3)


def _qwen2_5_vl_cfg():
    return T.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=4,
                           patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=4,
                           fullatt_block_indexes=[1], in_channels=3),
        text_config=dict(**TEXT, rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2])),
        image_token_id=IMG, video_token_id=AUX1, vision_start_token_id=AUX2, vision_end_token_id=AUX3)


def _paligemma_cfg():
    return T.PaliGemmaConfig(vision_config=SIGLIP, text_config=dict(model_type="gemma", **TEXT),
                             image_token_index=IMG, projection_dim=32, pad_token_id=PAD)


def _gemma3_cfg():
    return T.Gemma3Config(vision_config=SIGLIP,
                          text_config=dict(**TEXT, sliding_window=3,
                                           layer_types=["sliding_attention", "full_attention"]),
                          mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=AUX1, eoi_token_index=AUX2)


def _florence2_cfg():
    vision = dict(in_channels=3, depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                  window_size=2, drop_path_rate=0.0, mlp_ratio=2.0, projection_dim=32,
                  max_temporal_embeddings=4, max_position_embeddings=8)
    text = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
                forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return T.Florence2Config(vision_config=vision, text_config=text, image_token_id=IMG)


VLM = {"vision": ALL, "projector": NO_PREFIX, "language": ALL}

SPECS: list[Spec] = [
    Spec("instructblip", "InstructBLIP", "instructblip", _instructblip_cfg, T.InstructBlipForConditionalGeneration,
         {"vision": ALL, "qformer": ALL, "projector": NO_PREFIX, "language": ALL}, image_tokens=4,
         layout="instructblip"),
    Spec("llava", "LLaVA-1.5", "llava", _llava_cfg, T.LlavaForConditionalGeneration, VLM, image_tokens=16,
         layout="llava"),
    Spec("llava_next", "LLaVA-NeXT", "llava_next", _llava_next_cfg, T.LlavaNextForConditionalGeneration, VLM,
         layout="llava_next"),
    Spec("llava_onevision", "LLaVA-OneVision", "llava_onevision", _llava_ov_cfg,
         T.LlavaOnevisionForConditionalGeneration, VLM, layout="llava_next"),
    Spec("idefics3", "Idefics3", "idefics3", _idefics3_cfg(T.Idefics3Config), T.Idefics3ForConditionalGeneration,
         VLM, image_tokens=4, layout="idefics3"),
    Spec("smolvlm", "SmolVLM", "smolvlm", _idefics3_cfg(T.SmolVLMConfig), T.SmolVLMForConditionalGeneration,
         VLM, image_tokens=4, layout="idefics3"),
    Spec("qwen2_vl", "Qwen2-VL", "qwen2_vl", _qwen2_vl_cfg, T.Qwen2VLForConditionalGeneration, VLM,
         image_tokens=4, layout="qwen2_vl"),
    Spec("qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl", _qwen2_5_vl_cfg, T.Qwen2_5_VLForConditionalGeneration, VLM,
         image_tokens=4, layout="qwen2_vl"),
    Spec("paligemma", "PaliGemma", "paligemma", _paligemma_cfg, T.PaliGemmaForConditionalGeneration, VLM,
         image_tokens=16, layout="paligemma"),
    Spec("gemma3", "Gemma 3", "gemma3", _gemma3_cfg, T.Gemma3ForConditionalGeneration,
         {"vision": ALL, "language": ALL}, image_tokens=4, layout="gemma3", sliding=True,
         notes="projector is a bare weight matrix (no nn.Linear): no projector component"),
    Spec("florence2", "Florence-2", "florence2", _florence2_cfg, T.Florence2ForConditionalGeneration, VLM,
         layout="florence2", notes="language = BART encoder, decoder and cross-attention; vision prefixes in "
                                   "DaViT window attention only; positions=\"shift\" has no effect (BART's "
                                   "learned positions are not shifted); train CLI: image + prompt to the "
                                   "encoder, answer to the decoder, spectrum features from the encoder's last "
                                   "hidden states"),
    Spec("qwen3", "Qwen3", "qwen3", _text(T.Qwen3Config, use_sliding_window=True, sliding_window=3,
                                          max_window_layers=1, layer_types=["sliding_attention", "full_attention"]),
         T.Qwen3ForCausalLM, {"language": ALL}, sliding=True),
    Spec("phi3", "Phi-3", "phi3", _text(T.Phi3Config, sliding_window=3), T.Phi3ForCausalLM, {"language": ALL},
         sliding=True),
    # Gemma 3 1B is text-only (gemma3_text); soft-capping on here so the kwarg path is exercised
    Spec("gemma3_text", "Gemma 3 (text-only, 1B style)", "gemma3_text",
         _text(T.Gemma3TextConfig, sliding_window=3, attn_logit_softcapping=5.0,
               layer_types=["sliding_attention", "full_attention"]),
         T.Gemma3ForCausalLM, {"language": ALL}, sliding=True, softcap=True),
    Spec("gemma2", "Gemma 2", "gemma2", _text(T.Gemma2Config, sliding_window=3, attn_logit_softcapping=5.0,
                                              layer_types=["sliding_attention", "full_attention"]),
         T.Gemma2ForCausalLM, {"language": ALL}, sliding=True, softcap=True),
]
BY_ID = {s.id: s for s in SPECS}


def build(spec: Spec, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model of ``spec`` (deterministic for ``seed``), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(spec.make_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                # zero-initialised in a fresh model, trained in every real checkpoint; left at zero,
                # the image features would not depend on the vision tower (Gemma 3's projector) or
                # the Q-Former's query/key projections would get no gradient (InstructBLIP).
                if name.endswith(("mm_input_projection_weight", "query_tokens")):
                    p.normal_(0.0, 0.5)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, None, BOS  # never stop early: fixed lengths
    if spec.encoder_decoder:
        gc.decoder_start_token_id = EOS
    gc.forced_eos_token_id = gc.forced_bos_token_id = None
    return model.eval()


def save_and_reload(spec: Spec, model: torch.nn.Module, path) -> torch.nn.Module:
    """``save_pretrained`` then ``from_pretrained``: the real loading path."""
    model.save_pretrained(path)
    out = spec.model_class.from_pretrained(path)
    out.generation_config = model.generation_config
    return out.eval()


def _image_token_count(spec: Spec, model, pixel_values, image_sizes) -> int:
    """Placeholder tokens per image for the anyres models, asked of the model itself."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    feats = getattr(feats, "pooler_output", feats)
    return int(feats[0].shape[0])


def make_inputs(spec: Spec, model, batch: int = 2, lengths: tuple[int, ...] = (7, 4), seed: int = 1) -> dict:
    """Batched, LEFT-padded inputs (rows of different text lengths) for ``spec``.

    Multimodal rows carry one image each, with its placeholder tokens where the model's
    processor would put them.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = tuple(lengths[i % len(lengths)] for i in range(batch))
    text = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
    extra: dict[str, Any] = {}
    lay = spec.layout
    if lay == "text":
        rows = [[BOS] + t for t in text]
    elif lay in ("llava", "instructblip", "paligemma"):
        extra["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
        rows = ([[IMG] * spec.image_tokens + [BOS] + t for t in text] if lay == "paligemma"
                else [[BOS] + [IMG] * spec.image_tokens + t for t in text])
        if lay == "instructblip":
            extra["qformer_input_ids"] = torch.randint(3, 100, (batch, 5), generator=g)
            extra["qformer_attention_mask"] = torch.ones(batch, 5, dtype=torch.long)
    elif lay == "llava_next":
        pv = torch.randn(batch, 3, 3, 16, 16, generator=g)  # base view + 2 anyres crops of a 16x32 image
        sizes = torch.tensor([[16, 32]] * batch)
        n = _image_token_count(spec, model, pv, sizes)
        extra.update(pixel_values=pv, image_sizes=sizes)
        rows = [[BOS] + [IMG] * n + t for t in text]
    elif lay == "idefics3":
        extra["pixel_values"] = torch.randn(batch, 1, 3, 16, 16, generator=g)
        rows = [[BOS] + [IMG] * spec.image_tokens + t for t in text]
    elif lay == "qwen2_vl":
        grid = torch.tensor([[1, 4, 4]] * batch)  # t, h, w patches; 2x2 merge -> 4 tokens
        extra["pixel_values"] = torch.randn(batch * 16, 3 * 2 * 2 * 2, generator=g)
        extra["image_grid_thw"] = grid
        rows = [[AUX2] + [IMG] * spec.image_tokens + [AUX3] + t for t in text]
    elif lay == "gemma3":
        extra["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
        rows = [[BOS, AUX1] + [IMG] * spec.image_tokens + [AUX2] + t for t in text]
    elif lay == "florence2":
        extra["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=extra["pixel_values"][:1])
        feats = getattr(feats, "pooler_output", feats)
        n = int(feats.shape[1]) if feats.dim() == 3 else int(feats[0].shape[0])
        rows = [[BOS] + [IMG] * n + t + [EOS] for t in text]
    else:  # pragma: no cover
        raise ValueError(lay)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = {"input_ids": ids, "attention_mask": mask, **extra}
    if lay == "paligemma":
        out["token_type_ids"] = torch.zeros_like(ids)  # the whole prompt is the prefix-LM "prefix"
    if lay == "gemma3":
        out["token_type_ids"] = (ids == IMG).long()
    if lay == "qwen2_vl":
        out["mm_token_type_ids"] = (ids == IMG).int()  # what the processor returns beside input_ids
    if lay == "florence2":
        out["decoder_input_ids"] = torch.tensor([[EOS, BOS]] * batch)
    return out


def extend(spec: Spec, inputs: dict, next_tokens: torch.Tensor) -> dict:
    """``inputs`` with one more token per row (for step-by-step full forward passes)."""
    out = dict(inputs)
    col = next_tokens.view(-1, 1)
    key = "decoder_input_ids" if spec.encoder_decoder else "input_ids"
    out[key] = torch.cat([inputs[key], col], dim=1)
    if not spec.encoder_decoder:
        out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(col)], dim=1)
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(col).int()], dim=1)
        if "token_type_ids" in inputs:  # generated tokens are "suffix" (PaliGemma) / text (Gemma 3)
            fill = 1 if spec.layout == "paligemma" else 0
            out["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.full_like(col, fill)], dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# Tests. Every test records ``arch`` / ``feature`` (and the gradient test ``components``) as
# junit properties: tools/gen_arch_table.py builds docs/architectures.md from them.
# ----------------------------------------------------------------------------------------------

_BASE: dict[str, torch.nn.Module] = {}
_TMP = tempfile.TemporaryDirectory(prefix="ptpeft_families_")


def base_model(spec: Spec) -> torch.nn.Module:
    """A fresh copy of ``spec``'s tiny model, loaded once through save/from_pretrained."""
    torch.manual_seed(0)  # the PEFT modules patch() adds next are initialised reproducibly
    if spec.id not in _BASE:
        _BASE[spec.id] = save_and_reload(spec, build(spec), f"{_TMP.name}/{spec.id}")
    return copy.deepcopy(_BASE[spec.id])


def _components(spec: Spec, method: str) -> list[str]:
    return [c for c, methods in spec.components.items() if method in methods]


def full_config(spec: Spec, methods=ALL, init_std: float = 0.5, reparam: str = "mlp") -> pf.PTPeftConfig:
    """Prefix / LoRA / Adapter in every component of ``spec`` where they apply."""
    return pf.PTPeftConfig(
        prefix=pf.PrefixConfig(num_tokens=3, hidden_size=16, reparam=reparam, init_std=init_std,
                               components=_components(spec, "prefix")) if "prefix" in methods else None,
        lora=pf.LoraConfig(r=2, alpha=4, components=_components(spec, "lora")) if "lora" in methods else None,
        adapter=(pf.AdapterConfig(bottleneck=4, activation="gelu", components=_components(spec, "adapter"))
                 if "adapter" in methods else None),
    )


@torch.no_grad()
def randomize_peft(model: torch.nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Move LoRA B and adapter up off zero, so every added parameter matters and gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("lora_B", ".up.weight", ".up.bias")):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits_of(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _props(record_property, spec: Spec, feature: str) -> None:
    record_property("arch", spec.id)
    record_property("name", spec.name)
    record_property("feature", feature)
    if spec.notes:
        record_property("notes", spec.notes)


PARAMS = [pytest.param(s, id=s.id) for s in SPECS]


@pytest.mark.parametrize("spec", PARAMS)
def test_gradients_reach_exactly_the_intended_parameters(spec: Spec, record_property) -> None:
    """Prefix + LoRA + Adapter in every component: in each stage, exactly the trainable
    group's parameters get (nonzero) gradients, and no base weight does."""
    _props(record_property, spec, "train")
    record_property("components", ";".join(f"{c}={'+'.join(m)}" for c, m in spec.components.items()))
    model = pf.patch(base_model(spec), full_config(spec))
    randomize_peft(model)
    groups = parameter_groups(model)
    for comp in spec.components:  # every listed component really got its modules
        for method in spec.components[comp]:
            tag = {"prefix": f"prefix_{comp}", "lora": f"lora_{comp}", "adapter": f"adapter_{comp}"}[method]
            tags = (tag,) if comp != "language" or not spec.encoder_decoder else tuple(
                tag.replace("language", c) for c in ("encoder", "decoder"))
            assert any(t in n for n in groups for t in tags), f"no {method} parameters in component {comp}"
    inputs = make_inputs(spec, model)
    g = torch.Generator().manual_seed(5)
    for stage, trains in (("peft", {"prefix", "lora", "adapter"}), ("prefix", {"prefix"})):
        pf.set_stage(model, stage)
        model.zero_grad(set_to_none=True)
        logits = logits_of(model, inputs)
        (logits * torch.randn(logits.shape, generator=g)).sum().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        want = {n for n, grp in groups.items() if grp in trains}
        assert got == want, (f"stage {stage}: unexpected {sorted(got - want)[:5]}, "
                             f"missing {sorted(want - got)[:5]}")
        assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in got)


@pytest.mark.parametrize("spec", PARAMS)
def test_prefix_alone_changes_the_output_in_every_component(spec: Spec) -> None:
    """A prefix in one component at a time, nothing else: the logits move. A silent no-op (a layer
    whose attention never reaches ours, as T5 on transformers 5.17 before the fix) fails here on
    every stack the suite runs on."""
    ref_model = base_model(spec)
    inputs = make_inputs(spec, ref_model)
    with torch.no_grad():
        ref = logits_of(ref_model, inputs)
    for comp in _components(spec, "prefix"):
        cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3, hidden_size=16, init_std=0.5, components=[comp]),
                              lora=None, adapter=None)
        model = pf.patch(base_model(spec), cfg).eval()
        with torch.no_grad():
            assert rel_err(logits_of(model, inputs), ref) > 1e-4, f"a prefix in {comp} does not change the output"


@pytest.mark.parametrize("spec", PARAMS)
def test_identity_init_keeps_logits(spec: Spec, record_property) -> None:
    """LoRA (B = 0) and adapters (up = 0) everywhere, no prefix: logits equal the unpatched model's."""
    _props(record_property, spec, "identity")
    ref_model = base_model(spec)
    inputs = make_inputs(spec, ref_model)
    with torch.no_grad():
        ref = logits_of(ref_model, inputs)
        model = pf.patch(base_model(spec), full_config(spec, methods=NO_PREFIX))
        got = logits_of(model.eval(), inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _greedy_reference(spec: Spec, model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache): argmax of the last logits, appended."""
    cur = dict(inputs)
    out = []
    for _ in range(steps):
        kw = {}
        if not spec.encoder_decoder and spec.layout != "qwen2_vl":
            # Real tokens count from 0 in each row, as generate does for left padding (the prefix
            # keys are unrotated, so absolute positions matter). Qwen2-VL computes its M-RoPE
            # positions from the attention mask by itself.
            kw["position_ids"] = (cur["attention_mask"].cumsum(-1) - 1).masked_fill(cur["attention_mask"] == 0, 1)
        last = model(**cur, **kw, use_cache=False).logits[:, -1]
        last[:, list(SPECIAL)] = -math.inf  # as generate(suppress_tokens=SPECIAL)
        nxt = last.argmax(-1)
        out.append(nxt)
        cur = extend(spec, cur, nxt)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("spec", PARAMS)
def test_generate_with_prefix_equals_full_forward(spec: Spec, record_property) -> None:
    """Greedy ``generate`` (KV cache, prefix computed once) on a batched, left-padded
    (multimodal) batch equals step-by-step argmax of full forward passes."""
    _props(record_property, spec, "generate")
    model = pf.patch(base_model(spec), full_config(spec, methods=("prefix", "lora")))
    randomize_peft(model)
    pf.set_stage(model, "eval")
    inputs = make_inputs(spec, model)
    if spec.encoder_decoder:
        inputs["decoder_input_ids"] = torch.full((inputs["input_ids"].shape[0], 1), EOS)
    steps = 4
    with torch.no_grad():
        ref = _greedy_reference(spec, model, inputs, steps)
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, num_beams=1,
                             suppress_tokens=list(SPECIAL))
    new = gen[:, -steps:]
    assert torch.equal(new, ref), f"generate {new.tolist()} != full forward {ref.tolist()}"
    # the prefix is really there: the patched model's logits differ from the base model's
    with torch.no_grad():
        base = logits_of(base_model(spec), inputs)
        assert rel_err(logits_of(model, inputs), base) > 1e-3


@pytest.mark.parametrize("spec", PARAMS)
def test_merge_keeps_outputs(spec: Spec, record_property) -> None:
    """merge (LoRA folded into the weights, prefix MLPs turned into static K/V) keeps logits (fp32 ≤ 1e-5 rel)."""
    _props(record_property, spec, "merge")
    model = pf.patch(base_model(spec), full_config(spec))
    randomize_peft(model)
    pf.set_stage(model, "eval")
    inputs = make_inputs(spec, model)
    with torch.no_grad():
        before = logits_of(model, inputs)
        pf.merge(model)
        after = logits_of(model, inputs)
    assert all(getattr(layer, layer._ptpeft_lora).merged for layer in model._ptpeft.lora_layers.values())
    assert rel_err(after, before) <= 1e-5


@pytest.mark.parametrize("spec", PARAMS)
def test_save_load_round_trip(spec: Spec, record_property, tmp_path) -> None:
    """save → load into a fresh base model gives the same logits."""
    _props(record_property, spec, "save_load")
    model = pf.patch(base_model(spec), full_config(spec))
    randomize_peft(model)
    pf.set_stage(model, "eval")
    inputs = make_inputs(spec, model)
    pf.save(model, tmp_path / "ckpt")
    loaded = pf.load(base_model(spec), tmp_path / "ckpt")
    pf.set_stage(loaded, "eval")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, inputs), logits_of(model, inputs), rtol=0, atol=0)


class _Spy:
    """Re-registers the ``ptpeft`` attention with a wrapper that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        out, _ = pf_attention.ptpeft_attention_forward(module, query, key, value, attention_mask, scaling, dropout,
                                                       **kwargs)
        self.calls.append((module, query, key, value, attention_mask, scaling, kwargs, out))
        return out, None

    def __enter__(self):
        from transformers import AttentionInterface
        pf_attention.register()
        AttentionInterface.register(pf_attention.ATTN_IMPLEMENTATION, self)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface
        AttentionInterface.register(pf_attention.ATTN_IMPLEMENTATION, pf_attention.ptpeft_attention_forward)


def _window(spec: Spec, module) -> int | None:
    """The sliding window of an attention layer, read from the config (None: global layer)."""
    cfg = module.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[module.layer_idx] == "sliding_attention" else None
    return cfg.sliding_window  # Phi-3: every layer


def _reference_attention(q, k, v, pk, pv, allowed, scale, softcap=None, with_prefix=True):
    """float64 attention over [prefix; real keys], ``allowed`` [B,L,S] masks real keys only."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    pk, pv = pk.double().repeat_interleave(g, 0), pv.double().repeat_interleave(g, 0)
    s_real = (q @ k.transpose(-1, -2)) * scale
    s_pre = torch.einsum("bhld,hpd->bhlp", q, pk) * scale
    if softcap is not None:
        s_real, s_pre = torch.tanh(s_real / softcap) * softcap, torch.tanh(s_pre / softcap) * softcap
    s_real = s_real.masked_fill(~allowed[:, None], -math.inf)
    if not with_prefix:
        s_pre = torch.full_like(s_pre, -math.inf)
    p = torch.softmax(torch.cat([s_pre, s_real], -1), -1)
    P = pk.shape[1]
    return p[..., :P] @ pv + p[..., P:] @ v  # [B,H,L,D]


SLIDING = [pytest.param(s, id=s.id) for s in SPECS if s.sliding]


@pytest.mark.parametrize("spec", SLIDING)
def test_sliding_window_prefix_stays_visible(spec: Spec, record_property) -> None:
    """In sliding-window layers the window still limits the real keys, and every query,
    also one whose window no longer reaches the sequence start, sees the whole prefix
    (checked against a float64 reference built from the window rule, not from the mask)."""
    _props(record_property, spec, "sliding_window")
    model = pf.patch(base_model(spec), full_config(spec, methods=("prefix",), init_std=1.0))
    pf.set_stage(model, "eval")
    inputs = make_inputs(spec, model, lengths=(9, 6))
    pad = inputs["attention_mask"].bool()
    if spec.layout == "gemma3":  # image tokens attend bidirectionally: compare text-only rows
        inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        inputs["input_ids"] = torch.where(inputs["input_ids"] >= 100, 5, inputs["input_ids"])
    with _Spy() as spy, torch.no_grad():
        model(**inputs)
    L = pad.shape[1]
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    checked_sliding = checked_global = 0
    for module, q, k, v, _mask, scaling, kwargs, out in spy.calls:
        if q.shape[2] != L or not hasattr(module, "layer_idx"):
            continue  # vision tower layers
        window = _window(spec, module)
        allowed = pad[:, None, :] & (j <= i)[None]
        if window is not None:
            allowed = allowed & (j > i - window)[None]
        pk, pv = getattr(module, module._ptpeft_prefix).kv(q.dtype)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        ref = _reference_attention(q, k, v, pk, pv, allowed, scale, kwargs.get("softcap"))
        rows = pad  # queries at padding positions are not compared
        got = out.transpose(1, 2).double()
        err = (got - ref).permute(0, 2, 1, 3)[rows].norm() / ref.permute(0, 2, 1, 3)[rows].norm()
        assert err < 1e-5, f"layer {module.layer_idx} (window {window}): rel err {err:.2e}"
        if window is None:
            checked_global += 1
            continue
        checked_sliding += 1
        far = (i >= window).squeeze(1)  # queries whose window excludes some earlier real key
        assert far.any()
        no_prefix = _reference_attention(q, k, v, pk, pv, allowed, scale, kwargs.get("softcap"), with_prefix=False)
        diff = (got - no_prefix)[:, :, far].abs().amax()
        assert diff > 1e-3, "prefix has no effect on queries beyond the window"
    assert checked_sliding >= 1
    if spec.softcap:
        record_property("softcap", "1")


def test_softcap_without_prefix_matches_eager() -> None:
    """A soft-capped layer without a prefix (e.g. Gemma 2 as the language model of a model whose
    prefix is only in vision) still caps its logits: same result as Gemma 2's eager attention."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    spec = BY_ID["gemma2"]
    module = base_model(spec).model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g) * 3
    k, v = torch.randn(2, 2, 5, 8, generator=g) * 3, torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5).clone()
    mask[0, :, :, 0] = False
    ref, _ = eager_attention_forward(module, q, k, v, torch.where(mask, 0.0, torch.finfo(q.dtype).min),
                                     dropout=0.0, scaling=0.3, softcap=2.0)
    got, _ = pf_attention.ptpeft_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=2.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


MROPE = [pytest.param(s, id=s.id) for s in SPECS if s.layout == "qwen2_vl"]


@pytest.mark.parametrize("spec", MROPE)
def test_mrope_positions_kept_prefix_unrotated(spec: Spec, record_property) -> None:
    """Qwen2-VL / Qwen2.5-VL: the multimodal RoPE positions the model computes (3 x B x L, left
    padding and image grid included) are unchanged by the prefix, and the prefix keys reach the
    attention exactly as the prefix module made them (never rotated)."""
    _props(record_property, spec, "mrope")
    seen: dict[str, list] = {"base": [], "patched": []}

    def hook(tag):
        def fn(_m, args, kwargs):
            pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            seen[tag].append(pos.clone())
        return fn

    base = base_model(spec)
    model = pf.patch(base_model(spec), full_config(spec, methods=("prefix",)))
    pf.set_stage(model, "eval")
    inputs = make_inputs(spec, model)
    for tag, m in (("base", base), ("patched", model)):
        m.model.language_model.rotary_emb.register_forward_pre_hook(hook(tag), with_kwargs=True)
    with torch.no_grad():
        base(**inputs)
        with _Spy() as spy:
            model(**inputs)
    assert seen["base"] and len(seen["base"]) == len(seen["patched"])
    assert seen["base"][0].shape[0] == 3
    for a, b in zip(seen["base"], seen["patched"], strict=True):
        assert torch.equal(a, b)
    lm_calls = [c for c in spy.calls if hasattr(c[0], "layer_idx")]
    assert lm_calls
    for module, q, k, v, _mask, scaling, _kwargs, out in lm_calls:
        pk, pv = getattr(module, module._ptpeft_prefix).kv(q.dtype)
        # reference with the prefix as handed over (no rotation) reproduces the layer's output
        L = q.shape[2]
        allowed = inputs["attention_mask"].bool()[:, None, :] & torch.ones(L, L, dtype=torch.bool).tril()[None]
        ref = _reference_attention(q, k, v, pk, pv, allowed, scaling)
        rows = inputs["attention_mask"].bool()
        got = out.transpose(1, 2).double()
        err = (got - ref).permute(0, 2, 1, 3)[rows].norm() / ref.permute(0, 2, 1, 3)[rows].norm()
        assert err < 1e-5


SHIFTABLE = [pytest.param(s, id=s.id) for s in SPECS if not s.encoder_decoder]


@pytest.mark.parametrize("spec", SHIFTABLE)
def test_positions_shift_offsets_real_positions(spec: Spec, record_property) -> None:
    """positions="shift" hands the language model's rotary embedding exactly the positions of
    positions="keep" plus P (all three M-RoPE rows for Qwen2-VL), whether the model passes
    position_ids by keyword or positionally."""
    _props(record_property, spec, "positions_shift")
    seen: dict[str, list] = {}
    for mode in ("keep", "shift"):
        cfg = full_config(spec, methods=("prefix",))
        cfg.prefix.positions = mode
        model = pf.patch(base_model(spec), cfg)
        pf.set_stage(model, "eval")
        lm = dict(model.named_modules())
        rope = [m for n, m in lm.items() if n.endswith("rotary_emb") and "vision" not in n and "visual" not in n]
        assert len(rope) == 1

        def grab(_m, args, kwargs, mode=mode):
            pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            seen.setdefault(mode, []).append(pos.clone())
        rope[0].register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            model(**make_inputs(spec, model))
    assert len(seen["keep"]) == len(seen["shift"]) >= 1
    for keep, shift in zip(seen["keep"], seen["shift"], strict=True):
        assert torch.equal(shift, keep + 3)


# ----------------------------------------------------------------------------------------------
# Two-stage training through the train CLI (``ptpeft_fast.train``), the config selecting the
# model family: a tiny model AND its real processor class are saved to a folder that
# ``model.name`` points at, exactly as a user's local checkpoint would be.
# ----------------------------------------------------------------------------------------------

def _cli_tokenizer(*specials: str, **named: str):
    """Word-level tokenizer of tiny-blip2 plus the family's special tokens (never split);
    ``named`` become the tokenizer's named special tokens (``tok.image_token``, ``tok.boi_token``
    ..., as Gemma 3 and Florence-2 processors read them)."""
    from tokenizers import AddedToken

    from ptpeft_fast.models.tiny_blip2 import build_tokenizer

    tok = build_tokenizer()
    if named:
        tok = T.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                        extra_special_tokens=dict(named))
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    return tok


def _cli_text(tok, model_type: str | None = "llama") -> dict:
    out = {**TEXT, "vocab_size": len(tok), "bos_token_id": 2, "eos_token_id": 2}
    return {**out, "model_type": model_type} if model_type else out


def _cli_llava(cfg_cls, proc_cls, ip):
    tok = _cli_tokenizer("<image>")
    cfg = cfg_cls(text_config=_cli_text(tok), vision_config=CLIP, vision_feature_layer=-1,
                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                  **({"image_grid_pinpoints": [[16, 16], [16, 32]]} if cfg_cls is T.LlavaNextConfig else {}))
    proc = proc_cls(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, image_token="<image>")
    return cfg, proc, "<image> question: {question} answer:"


def _cli_qwen_vl(spec: Spec):
    """Qwen2-VL / Qwen2.5-VL: 16x16 images -> 8x8 patches of 2 -> 16 tokens after the 2x2 merge."""
    from ptpeft_fast.models import without_video

    tok = _cli_tokenizer("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    cfg = spec.make_config()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                          ("video_token_id", "<|video_pad|>"),
                                                          ("vision_start_token_id", "<|vision_start|>"),
                                                          ("vision_end_token_id", "<|vision_end|>"))}
    for k, v in ids.items():
        setattr(cfg, k, v)
        setattr(cfg.text_config, k, v)
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.bos_token_id = cfg.text_config.eos_token_id = 2
    ip = T.Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=256, patch_size=2, merge_size=2,
                                    temporal_patch_size=2)
    proc = without_video(T.Qwen2_5_VLProcessor if spec.id == "qwen2_5_vl" else T.Qwen2VLProcessor)(
        image_processor=ip, tokenizer=tok)
    return cfg, proc, "<|vision_start|><|image_pad|><|vision_end|> question: {question} answer:"


def _cli_text_family(spec: Spec):
    """A text-only family: the folder holds the model and its tokenizer only."""
    tok = _cli_tokenizer()
    cfg = spec.make_config()
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(tok), 2, 2, 0
    return cfg, tok, "question: {question} answer:"


def _cli_family(arch: str):
    """(config, processor, prompt template) of a tiny trainable model, or a skip reason (str)."""
    from ptpeft_fast.models import without_video

    spec = BY_ID[arch]
    if not spec.multimodal:
        return _cli_text_family(spec)
    if arch == "llava":
        return _cli_llava(T.LlavaConfig, T.LlavaProcessor, T.CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}))
    if arch == "llava_next":
        return _cli_llava(T.LlavaNextConfig, T.LlavaNextProcessor, T.LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=[[16, 16], [16, 32]]))
    if arch == "llava_onevision":  # SigLIP 16x16 / 4 = 16 tokens per view, no CLS ("full")
        tok = _cli_tokenizer("<image>", "<video>")
        cfg = T.LlavaOnevisionConfig(text_config=_cli_text(tok, "qwen2"), vision_config=SIGLIP, vision_feature_layer=-1,
                                     image_token_index=tok.convert_tokens_to_ids("<image>"),
                                     video_token_index=tok.convert_tokens_to_ids("<video>"),
                                     image_grid_pinpoints=[[16, 16], [16, 32]])
        ip = T.LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                               image_grid_pinpoints=[[16, 16], [16, 32]])
        proc = without_video(T.LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
            image_token="<image>", video_token="<video>")
        return cfg, proc, "<image> question: {question} answer:"
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return _cli_qwen_vl(spec)
    if arch == "paligemma":
        tok = _cli_tokenizer("<image>")
        ip = T.SiglipImageProcessorPil(size={"height": 16, "width": 16})
        ip.image_seq_length = 16
        cfg = T.PaliGemmaConfig(text_config=_cli_text(tok, "gemma"), vision_config=SIGLIP, projection_dim=32,
                                image_token_index=tok.convert_tokens_to_ids("<image>"))
        return cfg, T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok), "question: {question} answer:"
    if arch in ("idefics3", "smolvlm"):
        tok = _cli_tokenizer("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<video>")
        cfg = (T.Idefics3Config if arch == "idefics3" else T.SmolVLMConfig)(
            vision_config=dict(SIGLIP_LIKE), text_config=_cli_text(tok), scale_factor=2,
            image_token_id=tok.convert_tokens_to_ids("<image>"))
        kw = dict(size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False)
        if arch == "idefics3":
            proc = T.Idefics3Processor(image_processor=T.Idefics3ImageProcessorPil(**kw), tokenizer=tok,
                                       image_seq_len=4)
        else:  # SmolVLMProcessor needs num2words (the `test` extra) and, without torchvision, no video processor
            proc = without_video(T.SmolVLMProcessor)(image_processor=T.SmolVLMImageProcessorPil(**kw), tokenizer=tok,
                                                    image_seq_len=4)
        return cfg, proc, "<image> question: {question} answer:"
    if arch == "gemma3":  # SigLIP 16x16 / 4 = 16 patches, pooled to mm_tokens_per_image = 4
        tok = _cli_tokenizer(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
        cfg = T.Gemma3Config(vision_config=SIGLIP, mm_tokens_per_image=4,
                             text_config=dict(_cli_text(tok, None), sliding_window=3,
                                              layer_types=["sliding_attention", "full_attention"]),
                             image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                             eoi_token_index=tok.eoi_token_id)
        proc = T.Gemma3Processor(image_processor=T.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
                                 tokenizer=tok, image_seq_length=4)
        return cfg, proc, "<start_of_image> question: {question} answer:"
    if arch == "florence2":  # encoder: image tokens + prompt; decoder: the answer
        tok = _cli_tokenizer(image_token="<image>")
        cfg = _florence2_cfg()
        tc = cfg.text_config
        tc.vocab_size, tc.pad_token_id = len(tok), 0
        tc.bos_token_id = tc.eos_token_id = tc.decoder_start_token_id = 2
        cfg.image_token_id = tok.image_token_id
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # image tokens per 32x32 image, asked of the model
            feats = spec.model_class(cfg).model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
        feats = getattr(feats, "pooler_output", feats)
        ip = T.CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
        ip.image_seq_length = int(feats.shape[1]) if feats.dim() == 3 else int(feats[0].shape[0])
        return cfg, T.Florence2Processor(image_processor=ip, tokenizer=tok), "question: {question} answer:"
    if arch == "instructblip":
        tok = _cli_tokenizer("<image>")
        cfg = _instructblip_cfg()
        cfg.text_config = T.LlamaConfig(**{k: v for k, v in _cli_text(tok).items() if k != "model_type"})
        cfg.qformer_config.vocab_size = len(tok)
        cfg.image_token_index = tok.convert_tokens_to_ids("<image>")
        proc = T.InstructBlipProcessor(image_processor=T.BlipImageProcessorPil(size={"height": 16, "width": 16}),
                                       tokenizer=tok, qformer_tokenizer=_cli_tokenizer(), num_query_tokens=4)
        return cfg, proc, "question: {question} answer:"
    return f"no train-CLI setup for {arch!r} in this test"


@pytest.mark.parametrize("spec", PARAMS)
def test_two_stage_training_through_train_cli(spec: Spec, record_property, tmp_path) -> None:
    """``python -m ptpeft_fast.train --config ...`` with ``model.name`` = a local folder of this
    family (image-text: synthetic-shapes VQA; text-only: its synthetic-text variant): stage 1
    (prefix in every prefix component) then stage 2 (LoRA in every component) run, the training
    loss falls in each stage (the same 8 samples every step), and the stage-2 checkpoint holds
    prefix and LoRA weights of each component asked for."""
    _props(record_property, spec, "train_cli")
    made = _cli_family(spec.id)
    if isinstance(made, str):
        pytest.skip(made)
    import yaml
    from safetensors import safe_open

    from ptpeft_fast.train import main as train_main

    cfg, proc, prompt = made
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.model_class(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mm_input_projection_weight", "query_tokens")):  # zero-initialised, see build()
                    p.normal_(0.0, 0.5)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    prefix_comps = _components(spec, "prefix")
    lora_comps = _components(spec, "lora")
    run_cfg = {
        "model": {"name": str(tmp_path / "model")},
        # 2 scenes x 4 questions = 8 samples = one batch: every step sees the same batch
        "data": {"format": "synthetic-shapes" if spec.multimodal else "synthetic-text", "task": "vqa",
                 "prompt": prompt, "train": {"n": 2}, "val": {"n": 1}, "synthetic": {"seed": 0, "image_size": 16}},
        "stage1": {"max_steps": 4, "batch_size": 8, "lr": 1e-2,
                   "prefix": {"num_tokens": 2, "hidden_size": 16, "components": prefix_comps}},
        "stage2": {"method": "lora", "max_steps": 4, "batch_size": 8, "lr": 5e-3,
                   "lora": {"r": 2, "alpha": 4, "components": lora_comps}},
        "eval": {"zero_shot": False, "after_each_stage": False, "spectrum": True, "spectrum_samples": 4,
                 "max_new_tokens": 2, "batch_size": 4},
        "train": {"progress": False, "log_every": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    threads = torch.get_num_threads()
    try:
        rc = train_main(["--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with safe_open(str(tmp_path / "run" / "checkpoints" / "stage2" / "ptpeft.safetensors"), "pt") as f:
        names = list(f.keys())
    # an encoder-decoder's "language" is its encoder, decoder and cross-attention components
    parts = {"language": ("encoder", "decoder", "cross")} if spec.encoder_decoder else {}
    for method, comps in (("prefix", prefix_comps), ("lora", lora_comps)):
        for comp in comps:
            for part in parts.get(comp, (comp,)):
                assert any(f"{method}_{part}." in n for n in names), f"no {method}_{part} in the stage-2 checkpoint"
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in ("stage1", "stage2"):
        losses = [e["loss"] for e in events if e.get("event") == "train" and e["stage"] == stage]
        assert len(losses) == 4, (stage, losses)
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (stage, losses)
    ev = [e for e in events if e.get("event") == "eval"]  # the final evaluation: generate + spectrum
    assert len(ev) == 1 and ev[0]["n"] == 4 and ev[0]["spectrum"]["effective_rank"] > 1, ev


# ----------------------------------------------------------------------------------------------
# The pieces the train CLI uses for these families, checked on their own.
# ----------------------------------------------------------------------------------------------

CLI_MM = [pytest.param(s, id=s.id) for s in SPECS if s.multimodal]


@pytest.mark.parametrize("spec", CLI_MM)
def test_collator_images_one_list_per_sample(spec: Spec) -> None:
    """The collator hands every multimodal processor one list of images per sample; where a
    processor also takes the flat list (it flattens), both give identical tensors, so the
    nested layout changes nothing for it (Gemma 3 and SmolVLM refuse the flat list of 2 images
    for 2 prompts: they read it as 2 images of ONE prompt)."""
    from PIL import Image

    from ptpeft_fast.models import _images_arg

    _, proc, prompt = _cli_family(spec.id)
    ims = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    texts = [prompt.format(question="what color") + " red", prompt.format(question="how many") + " one two"]
    nested = proc(images=_images_arg(proc, ims), text=texts, padding=True, return_tensors="pt")
    assert nested["input_ids"].shape[0] == 2
    try:
        flat = proc(images=ims, text=texts, padding=True, return_tensors="pt")
    except ValueError:
        assert spec.id in ("gemma3", "smolvlm"), "only Gemma 3 and SmolVLM are expected to refuse the flat list"
        return
    assert spec.id not in ("gemma3", "smolvlm")
    assert sorted(flat.keys()) == sorted(nested.keys())
    for k in flat:
        if torch.is_tensor(flat[k]):
            assert torch.equal(flat[k], nested[k]), k


def test_encoder_decoder_labels_match_the_models_own_loss(tmp_path) -> None:
    """Florence-2 through the collator and the trainer's loss (causal shift of logits against
    labels): the same per-token loss as the model's own ``labels=`` loss (BART shifts labels
    right behind the decoder start token)."""
    import torch.nn.functional as F

    from ptpeft_fast.data import synthetic
    from ptpeft_fast.models import MMCollator

    spec = BY_ID["florence2"]
    cfg, proc, prompt = _cli_family("florence2")
    torch.manual_seed(0)
    model = spec.model_class(cfg).eval()
    recs = synthetic.make_records("vqa", "train", 1, image_size=16)[:3]
    for r in recs:
        r.meta["task"] = "vqa"
    items = [(r, r.image()) for r in recs]
    b = MMCollator(proc, prompt, train=True, decoder_start_token_id=2)(items)
    assert torch.equal(b["decoder_input_ids"][:, 0], torch.full((3,), 2))
    assert (b["labels"][:, 0] == -100).all()
    inp = {k: v for k, v in b.items() if k not in ("labels", "record_ids")}
    with torch.no_grad():
        logits = model(**inp).logits
        lg = logits[:, :-1]
        ours = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        target = b["labels"][:, 1:].contiguous()  # what the model should predict: target + EOS, -100 on padding
        theirs = model(**{k: v for k, v in inp.items() if not k.startswith("decoder_")}, labels=target).loss
    torch.testing.assert_close(ours, theirs)
    # generation-mode batches carry encoder inputs only
    g = MMCollator(proc, prompt, train=False, decoder_start_token_id=2)(items)
    assert "decoder_input_ids" not in g and "labels" not in g


def test_synthetic_text_records_carry_the_answer_in_the_prompt() -> None:
    from ptpeft_fast.data import load_split, synthetic

    recs = synthetic.make_text_records("vqa", "train", 3, seed=0)
    img = synthetic.make_records("vqa", "train", 3, seed=0)
    assert [r.id for r in recs] == [r.id for r in img] and all(r.image is None for r in recs)
    for r, q in zip(recs, img, strict=True):
        assert r.targets == q.targets and r.question.endswith(" . " + q.question)
        a = r.meta["attrs"]
        assert a["color"] in r.question and a["position"] in r.question and a["kind"] in r.question
        assert synthetic.COUNT_WORDS[a["count"]] in r.question.split()
    ds = load_split({"format": "synthetic-text", "task": "vqa", "train": {"n": 2}}, "train")
    assert len(ds) == 8 and not ds.has_images and ds[0][1] is None


def test_text_only_data_options_fail_before_work(tmp_path) -> None:
    """synthetic-text is VQA only (config validation names data.task); JSONL lines without
    ``image`` are text-only records; a split mixing both is refused naming both records."""
    from ptpeft_fast.data import DataError, load_split
    from ptpeft_fast.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.task"):
        load_config(None, ["data.format=synthetic-text", "data.task=caption"])
    load_config(None, ["data.format=synthetic-text"])
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "question": "red circles . what color ?", "answers": ["red"]}\n'
                 '{"id": "b", "question": "two squares . how many ?", "answer": "2"}\n')
    ds = load_split({"format": "jsonl", "task": "vqa", "train": {"path": str(p)}}, "train")
    assert [r.image for r in ds.records] == [None, None] and not ds.has_images
    (tmp_path / "x.png").write_bytes(b"")
    p.write_text(p.read_text() + '{"id": "c", "image": "x.png", "question": "q", "answers": ["a"]}\n')
    with pytest.raises(DataError, match="'c'.*'a'|'a'.*'c'"):
        load_split({"format": "jsonl", "task": "vqa", "train": {"path": str(p)}}, "train")


def test_text_only_model_refuses_image_data_and_vice_versa(tmp_path) -> None:
    """A text-only folder with image data (and an image-text folder with text-only data) is
    a ConfigError naming data.train before any training step."""
    from ptpeft_fast.train.config import ConfigError, load_config
    from ptpeft_fast.train.tasks import make_run

    for arch, fmt, msg in (("qwen3", "synthetic-shapes", "text-only model"),
                           ("llava", "synthetic-text", "image-text model")):
        cfg, proc, prompt = _cli_family(arch)
        BY_ID[arch].model_class(cfg).save_pretrained(tmp_path / arch)
        proc.save_pretrained(tmp_path / arch)
        c = load_config(None, [f"model.name={tmp_path / arch}", f"data.format={fmt}", "data.train={n: 2}",
                               "data.val={n: 1}", "train.progress=false", "stage1.batch_size=2",
                               "stage2.batch_size=2"])
        with pytest.raises(ConfigError, match=f"data.train.*{msg}"):
            make_run(c, str(tmp_path / f"run_{arch}")).execute()
        assert not (tmp_path / f"run_{arch}" / "checkpoints").exists()


def test_processor_without_video_loads_and_names_the_folder_when_it_cannot(tmp_path) -> None:
    """Without torchvision AutoProcessor cannot build Qwen2-VL's processor (it asks for a video
    processor); load_local_model builds it from the tokenizer and the PIL image processor. A
    folder lacking the image processor fails naming the folder and what failed."""
    from ptpeft_fast.models import load_local_model, load_processor

    spec = BY_ID["qwen2_vl"]
    cfg, proc, _ = _cli_family("qwen2_vl")
    spec.model_class(cfg).save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    model, loaded = load_local_model(str(tmp_path / "m"))
    assert type(loaded).__name__ == "Qwen2VLProcessor" and isinstance(loaded, T.Qwen2VLProcessor)
    # with torchvision (the oldest stack has it) AutoProcessor builds it, with transformers' choice of
    # image processor; without, load_local_model's fallback gives the PIL one
    if importlib.util.find_spec("torchvision") is None:
        assert type(loaded.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert loaded.image_processor.to_dict()["size"] == {"longest_edge": 256, "shortest_edge": 64}  # saved, not defaults
    (tmp_path / "m" / "processor_config.json").write_text('{"processor_class": "Qwen2VLProcessor"}')
    with pytest.raises(ValueError, match=r"m: cannot load the processor Qwen2VLProcessor.*without its video processor"):
        load_processor(str(tmp_path / "m"))
