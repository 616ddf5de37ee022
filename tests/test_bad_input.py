"""Bad input gets one clear ValueError that names the problem and the fix, and leaves the model as it
was: a prefix that could not act, LoRA targets that match nothing, wrong config types, a prefix longer
than the position table, non-finite weights."""
import json
import warnings

import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast.config import PTPeftConfig

import tiny


def _unpatched(model, before):
    assert not hasattr(model, "_ptpeft")
    assert [n for n, _ in model.named_parameters()] == before


def test_a_model_whose_attention_cannot_take_a_prefix_is_refused():
    # Bloom keeps its own attention code on every transformers we support (Falcon did until 5.25)
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 64, (1, 6))
    ref = model(ids).logits
    before = [n for n, _ in model.named_parameters()]
    cfg = PTPeftConfig.from_dict({"prefix": {"num_tokens": 4}, "lora": None, "targets": {
        "layers": r"transformer\.h\.\d+", "attention": ["self_attention"]}})
    with pytest.raises(ValueError, match="BloomForCausalLM cannot take a prefix.*AttentionInterface") as e:
        pf.patch(model, cfg)
    assert "prefix: null" in str(e.value)
    _unpatched(model, before)
    assert torch.equal(model(ids).logits, ref)
    # LoRA alone does not need the attention interface
    pf.patch(model, {"prefix": None, "lora": {"r": 2, "targets": ["query_key_value"]},
                     "targets": {"layers": r"transformer\.h\.\d+", "attention": ["self_attention"]}})
    assert len(model._ptpeft.lora_layers) == 2


FALCON_VARIANTS = {"rotary": dict(new_decoder_architecture=False),
                   "alibi": dict(alibi=True, new_decoder_architecture=False),
                   "gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
                   "multi_query": dict(multi_query=True, new_decoder_architecture=False)}


@pytest.mark.parametrize("variant", sorted(FALCON_VARIANTS))
def test_falcon_takes_a_prefix_where_its_attention_goes_through_the_interface(variant):
    """transformers 5.25 moved Falcon onto the AttentionInterface: there its prefix acts (sized by
    its key/value heads) and a left-padded row keeps its real logits; before 5.25 it is refused."""
    import transformers
    from packaging.version import Version
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          **FALCON_VARIANTS[variant])
    model = FalconForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = {"prefix": {"num_tokens": 4, "reparam": "none"}, "lora": None,
           "targets": {"layers": r"transformer\.h\.\d+", "attention": ["self_attention"]}}
    if Version(transformers.__version__) < Version("5.25"):
        with pytest.raises(ValueError, match="FalconForCausalLM cannot take a prefix"):
            pf.patch(model, cfg)
        return
    pf.patch(model, cfg)
    pf.set_stage(model, "eval")
    attn = model.transformer.h[0].self_attention
    kv = attn.num_kv_heads if (config.new_decoder_architecture or not config.multi_query) else 1
    keys = [p for n, p in model.named_parameters() if n.startswith("transformer.h.0.") and "prefix" in n]
    assert [tuple(p.shape) for p in keys] == [(kv, 4, config.head_dim)] * 2  # key and value, [Hkv, P, D]
    with torch.no_grad():
        out = model(ids).logits
        assert float((out - ref).abs().max()) > 1e-3
        with pf.disabled(model):
            assert torch.equal(model(ids).logits, ref)
        pad = 3
        padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones_like(ids)], 1)
        left = model(padded, attention_mask=mask).logits[:, pad:]
    # ALiBi biases by absolute distance, so left padding moves nothing; rotary uses positions 0..L-1 for real tokens
    assert tiny.rel_err(left, out) <= 1e-5


def test_every_lora_target_that_matches_nothing_is_named(tmp_path):
    model = tiny.llama(tmp_path)
    before = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError) as e:
        pf.patch(model, {"lora": {"targets": ["q_proj", "v_prj", "k_prj"]}})
    msg = str(e.value)
    assert "['v_prj', 'k_prj']" in msg and "'v_proj'" in msg and "'q_proj'" in msg.split("named:")[1]
    assert "mlp_in" not in msg and "mlp_out" not in msg  # our prefix's MLP is not one of the model's layers
    _unpatched(model, before)
    with pytest.raises(ValueError, match="its linear layers are named") as e:
        pf.patch(model, {"lora": {"targets": ["qq"]}})  # nothing matches at all
    assert "'o_proj'" in str(e.value) and "mlp_in" not in str(e.value)
    _unpatched(model, before)


@pytest.mark.parametrize("section,value,key", [
    ({"prefix": {"components": 3}}, None, "prefix.components"),
    ({"lora": {"targets": 5}}, None, "lora.targets"),
    ({"lora": {"components": {"a": 1}}}, None, "lora.components"),
    ({"adapter": {"components": 1.5}}, None, "adapter.components"),
    ({"prefix": {"num_tokens": "8"}}, None, "prefix.num_tokens"),
    ({"version": 99}, None, "newer than this ptpeft_fast"),
    ({"version": "1"}, None, "version must be a positive integer"),
    ({"prefix": [1]}, None, "prefix must be a PrefixConfig, a mapping of its fields or None"),
])
def test_wrong_config_types_name_the_key(section, value, key):
    with pytest.raises(ValueError) as e:
        PTPeftConfig.from_dict(section)
    assert key in str(e.value) and not isinstance(e.value, TypeError)


def test_an_adapter_wider_than_its_layer_warns(tmp_path):
    model = tiny.llama(tmp_path)  # hidden 64
    with pytest.warns(UserWarning, match="adapter.bottleneck=64 is not smaller than the hidden size 64"):
        pf.patch(model, {"prefix": None, "lora": None, "adapter": {"bottleneck": 64}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pf.patch(tiny.llama(tmp_path), {"prefix": None, "lora": None, "adapter": {"bottleneck": 16}})


def test_a_prefix_longer_than_the_position_table_is_refused(tmp_path):
    model = tiny.gpt2(tmp_path)  # n_positions 128
    before = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"num_tokens=128 .*table of 128.*at most 127"):
        pf.patch(model, {"prefix": {"num_tokens": 128, "positions": "shift"}, "lora": None})
    _unpatched(model, before)
    pf.patch(model, {"prefix": {"num_tokens": 100, "positions": "shift"}, "lora": None})
    model(torch.randint(0, tiny.VOCAB, (1, 28)))  # 100 + 28 = 128 positions: fits
    with pytest.raises(ValueError, match="29 tokens after 100 prefix positions exceed the model's 128 positions"):
        model(torch.randint(0, tiny.VOCAB, (1, 29)))
    # positions="keep" has no such limit from the prefix
    pf.patch(tiny.gpt2(tmp_path), {"prefix": {"num_tokens": 200, "positions": "keep"}, "lora": None})


def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path):
    model = pf.patch(tiny.llama(tmp_path), {"prefix": {"num_tokens": 4, "reparam": "none"}})
    good = tmp_path / "good"
    pf.save(model, good)
    name, param = next((n, p) for n, p in model.named_parameters() if "prefix" in n)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"tensor {name} holds 1 NaN/Inf value\(s\)"):
        pf.save(model, good)
    fresh = pf.load(tiny.llama(tmp_path), good)  # the earlier checkpoint is intact
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    # a file with NaN written by someone else: refused on load
    import hashlib

    from safetensors.torch import load_file, save
    tensors = load_file(good / "ptpeft.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("inf")
    blob = save(tensors, metadata={"format": "pt"})
    (good / "ptpeft.safetensors").write_bytes(blob)
    meta = json.loads((good / "ptpeft_config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (good / "ptpeft_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"tensor {name} holds 1 NaN/Inf .*was not loaded"):
        pf.load(tiny.llama(tmp_path), good)


# ------------------------------------------------------------------ checkpoints carry their meaning


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _trained(tmp_path, cfg):
    """A patched tiny Llama whose LoRA/prefix are random (so a wrong scaling shows in the logits)."""
    torch.manual_seed(1)
    model = pf.patch(tiny.llama(tmp_path), cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n or "prefix" in n:
                p.normal_(0, 0.2)
    return model


IDS = torch.randint(0, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("change,key", [
    ({"lora": {"r": 4, "alpha": 64}}, "lora.alpha: 16.0 in the checkpoint, 64.0 in the model"),
    ({"prefix": {"num_tokens": 4, "positions": "shift"}}, "prefix.positions: 'keep' in the checkpoint, 'shift'"),
    ({"lora": {"r": 4, "targets": ["q_proj"]}}, "lora.targets: None in the checkpoint, ['q_proj'] in the model"),
    ({"adapter": {"bottleneck": 8, "activation": "gelu"}}, "adapter: off in the checkpoint, on in the model"),
])
def test_load_refuses_a_config_that_changes_outputs(tmp_path, change, key):
    base = {"prefix": {"num_tokens": 4}, "lora": {"r": 4, "alpha": 16}}
    saved = _trained(tmp_path, base)
    pf.save(saved, tmp_path / "ck")
    other = {**base, **change}
    model = pf.patch(tiny.llama(tmp_path), other).eval()
    with pytest.raises(ValueError, match="another config") as e:
        pf.load(model, tmp_path / "ck")
    assert key in str(e.value) and "reconfigure=True" in str(e.value)
    pf.load(model, tmp_path / "ck", reconfigure=True)
    assert torch.allclose(_logits(model, IDS), _logits(saved, IDS), atol=1e-6)
    assert pf.PTPeftConfig.to_dict(model._ptpeft.config) == saved._ptpeft.config.to_dict()


def test_training_only_keys_may_differ(tmp_path):
    saved = _trained(tmp_path, {"prefix": {"num_tokens": 4}, "lora": {"r": 4}})
    pf.save(saved, tmp_path / "ck")
    model = pf.patch(tiny.llama(tmp_path), {"prefix": {"num_tokens": 4, "dropout": 0.1, "init_std": 0.5},
                                            "lora": {"r": 4, "dropout": 0.2}, "freeze_prefix": True}).eval()
    pf.load(model, tmp_path / "ck")
    assert torch.allclose(_logits(model, IDS), _logits(saved, IDS), atol=1e-6)


def test_merge_is_a_state_that_checkpoints_and_stages_respect(tmp_path):
    cfg = {"prefix": {"num_tokens": 4}, "lora": {"r": 4}}
    a = _trained(tmp_path, cfg)
    ref_a = _logits(a, IDS)
    pf.merge(a)
    assert torch.allclose(_logits(a, IDS), ref_a, atol=1e-5)
    with pytest.raises(ValueError, match=r"merged into the base weights.*ptpeft_fast.unmerge\(model\) first"):
        pf.set_stage(a, "peft")
    pf.save(a, tmp_path / "merged")
    # into a fresh model: same outputs
    fresh = pf.load(tiny.llama(tmp_path), tmp_path / "merged").eval()
    assert torch.allclose(_logits(fresh, IDS), ref_a, atol=1e-5)
    # into another merged model (other weights folded in): its own B·A is replaced, not kept
    torch.manual_seed(5)
    b = _trained(tmp_path, cfg)
    pf.merge(b)
    pf.load(b, tmp_path / "merged")
    assert torch.allclose(_logits(b, IDS), ref_a, atol=1e-5)
    pf.unmerge(b)
    assert torch.allclose(_logits(b, IDS), ref_a, atol=1e-5)
    pf.set_stage(b, "peft")  # allowed again after unmerge
    # an unmerged checkpoint into a merged model
    c = _trained(tmp_path, cfg)
    pf.save(pf.unmerge(a), tmp_path / "unmerged")
    pf.merge(c)
    pf.load(c, tmp_path / "unmerged")
    assert torch.allclose(_logits(c, IDS), ref_a, atol=1e-5)


def test_unpatch_restores_the_plain_model(tmp_path):
    plain = tiny.llama(tmp_path)
    ref = _logits(plain, IDS)
    names = [n for n, _ in plain.named_parameters()]
    model = _trained(tmp_path, {"prefix": {"num_tokens": 4}, "lora": {"r": 4}, "adapter": {"bottleneck": 8}})
    pf.merge(model)
    pf.unpatch(model)
    assert [n for n, _ in model.named_parameters()] == names and not hasattr(model, "_ptpeft")
    assert torch.allclose(_logits(model, IDS), ref, atol=1e-5)


def test_sections_given_to_the_constructor_as_mappings_are_converted_or_refused(tmp_path):
    cfg = PTPeftConfig(prefix={"num_tokens": 10}, lora={"r": 4})
    assert isinstance(cfg.prefix, pf.PrefixConfig) and cfg.prefix.num_tokens == 10 and cfg.lora.r == 4
    pf.patch(tiny.llama(tmp_path), cfg)  # the AttributeError of issue 31 is gone
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prefix.num_token'\]"):
        PTPeftConfig(prefix={"num_token": 10})
    with pytest.raises(ValueError, match="targets needs 'layers'.*'attention'"):
        PTPeftConfig(targets={"attention": r"layers\.\d+", "lora": ["q_proj"]})  # the form the old docstring showed


def test_an_attention_mask_that_does_not_fit_the_tokens_is_refused_with_the_fix(tmp_path):
    model = pf.patch(tiny.llama(tmp_path), {"prefix": {"num_tokens": 3}, "lora": {"r": 2}}).eval()
    ids = torch.randint(3, tiny.VOCAB, (2, 13))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 10\] but input_ids has \[2, 13\].*tokenizer"):
        model(ids, attention_mask=torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3, 13\] but input_ids has \[2, 13\]"):
        model(ids, attention_mask=torch.ones(3, 13, dtype=torch.long))
    # generate (a KV cache: the mask covers cached and new tokens) is unaffected
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)


@pytest.mark.parametrize("family", ["falcon", "bloom"])
def test_a_model_the_table_lacks_is_told_apart_and_given_targets_that_fit_it(family):
    """One message says whether the attention can take a prefix, with targets read off the model
    itself; those targets patch the model as they are (issue 31: a Llama-shaped example was given)."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

    from ptpeft_fast.architectures import routes_through_attention_interface, suggest_targets

    def build():
        torch.manual_seed(0)
        if family == "falcon":
            return FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, new_decoder_architecture=False))
        return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))

    model = build()
    targets, attention = suggest_targets(model)
    assert targets["layers"] == r"transformer\.h\.\d+" and targets["attention"] == ["self_attention"]
    assert set(targets["lora"]) == {"query_key_value", "dense"} and "prefix_" not in repr(targets)
    with pytest.raises(ValueError) as e:
        pf.patch(model)
    msg = str(e.value)
    assert f"model_type {family!r} is not in ptpeft_fast's architecture table" in msg and repr(targets) in msg
    assert "\n" not in msg and "q_proj" not in msg
    if routes_through_attention_interface(attention):  # Falcon on transformers >= 5.25
        assert "so it can take a prefix" in msg
        pf.patch(build(), pf.PTPeftConfig(targets=targets))
    else:
        assert "cannot take a prefix: LoRA and adapters only" in msg
        patched = pf.patch(build(), pf.PTPeftConfig(prefix=None, targets=targets))
        assert len(patched._ptpeft.lora_layers) == 4
