"""save_merged: a plain HF checkpoint (LoRA folded in) + static prefix file + loader note."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ptpeft_fast as pf
from ptpeft_fast.interop import load_static_prefix, save_merged
from ptpeft_fast.interop.merged import PREFIX_FILE, README_FILE

from _tiny_models import batch, blip2_inputs, load, logits, randomize, real


def assert_close(out, ref, tol=1e-5):
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= tol, rel


def _plain(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_only_merged_checkpoint_loads_plain_with_same_logits(kind, tmp_path):
    model = pf.patch(load(kind), pf.PTPeftConfig(prefix=None, lora=pf.LoraConfig(r=4)))
    randomize(model, "lora_B")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_merged(model, tmp_path)
    # the user's model is untouched, bit for bit, and still unmerged
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.lora_language.merged for layer in model._ptpeft.lora_layers.values())
    assert not (out / PREFIX_FILE).exists()
    plain = _plain(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids, mask = batch()
    assert_close(logits(plain, ids, mask), logits(model, ids, mask))


def test_prefix_and_lora_merged_checkpoint_round_trip(tmp_path):
    cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3, reparam="mlp-global", hidden_size=16, init_std=0.5),
                          lora=pf.LoraConfig(r=4))
    model = pf.patch(load(), cfg)
    randomize(model, "lora_B")
    model.eval()
    out = save_merged(model, tmp_path)
    config_json = (out / "config.json").read_text()
    assert "ptpeft" not in config_json  # no custom attention asked of a plain install
    assert model.config._attn_implementation == "ptpeft"  # restored on the user's model
    readme = (out / README_FILE).read_text()
    assert "load_static_prefix" in readme and "from_pretrained" in readme
    from safetensors import safe_open

    with safe_open(str(out / PREFIX_FILE), "pt") as f:
        assert set(f.keys()) == {f"model.layers.{i}.self_attn.{kv}" for i in range(2) for kv in ("key", "value")}
        assert f.get_tensor("model.layers.0.self_attn.key").shape == (2, 3, 16)  # [Hkv, P, D]
        assert json.loads(f.metadata()["prefix_config"])["reparam"] == "none"

    plain = _plain(out)
    with_prefix = load_static_prefix(plain, out)
    ids, mask = batch(2)
    assert_close(logits(with_prefix, ids, mask), logits(model, ids, mask))


def test_already_merged_lora_is_not_merged_twice(tmp_path):
    model = pf.patch(load(), pf.PTPeftConfig(prefix=None, lora=pf.LoraConfig(r=2)))
    randomize(model, "lora_B")
    model.eval()
    ids, mask = batch(3)
    ref = logits(model, ids, mask)
    pf.merge(model)
    assert_close(logits(_plain(save_merged(model, tmp_path)), ids, mask), ref)


def test_adapters_cannot_be_merged(tmp_path):
    model = pf.patch(load(), pf.PTPeftConfig(prefix=None, lora=None, adapter=pf.AdapterConfig(bottleneck=4)))
    with pytest.raises(ValueError, match="adapters.*nonlinear"):
        save_merged(model, tmp_path)


def test_load_static_prefix_refuses_other_model_type(tmp_path):
    model = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, reparam="none"), lora=None))
    save_merged(model, tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        load_static_prefix(load("gpt2"), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_static_prefix(load(), tmp_path / "nope")


def test_blip2_prefix_in_every_component_and_lora_merged(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, hidden_size=8, init_std=0.3,
                                                 components=("vision", "qformer", "language")),
                          lora=pf.LoraConfig(r=2, components=("language", "qformer")))
    model = pf.patch(load("blip2"), cfg)
    randomize(model, "lora_B")
    model.eval()
    out = save_merged(model, tmp_path)
    plain, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    load_static_prefix(plain.eval(), out)
    inputs = blip2_inputs(model, seed=1)
    with torch.no_grad():
        assert_close(plain(**inputs).logits, model(**inputs).logits)


def test_readme_recipe_without_ptpeft_fast_for_shifted_prefix(tmp_path):
    """positions='shift': the saved prefix is exactly a P-token KV cache for plain transformers (as README.txt says)."""
    from safetensors.torch import load_file
    from transformers import DynamicCache

    cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3, hidden_size=8, positions="shift", init_std=0.5),
                          lora=pf.LoraConfig(r=2))
    model = pf.patch(load(), cfg)
    randomize(model, "lora_B")
    model.eval()
    out = save_merged(model, tmp_path)
    assert "DynamicCache" in (out / README_FILE).read_text() and "position_ids" in (out / README_FILE).read_text()
    plain = _plain(out)
    kv = load_file(str(out / PREFIX_FILE))
    ids, mask = batch(4)  # left padding: position_ids from the mask, as README.txt says
    B = ids.shape[0]
    cache = DynamicCache(config=plain.config)
    for i in range(plain.config.num_hidden_layers):
        k, v = (kv[f"model.layers.{i}.self_attn.{n}"].unsqueeze(0).expand(B, -1, -1, -1) for n in ("key", "value"))
        cache.update(k, v, i)
    with torch.no_grad():
        got = plain(input_ids=ids, attention_mask=torch.cat([torch.ones(B, 3, dtype=mask.dtype), mask], 1),
                    past_key_values=cache, position_ids=3 + (mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert_close(real(got, mask), real(logits(model, ids, mask), mask))
