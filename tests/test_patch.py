"""patch(): identity at init, prefix semantics in real models, stages, merge, save/load, generation."""
import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast.tuners.prefix import LayerPrefix

import tiny
from tiny import randomise_peft, rel_err

TEXT = ["llama", "gpt2", "opt", "mistral", "qwen2"]


def _ids(b=2, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, tiny.VOCAB - 1, (b, length), generator=g)


def _forward(model, kind, **kw):
    if kind in ("vit",):
        return model(pixel_values=kw["pixel_values"]).last_hidden_state
    if kind in ("clip", "siglip"):
        out = model(input_ids=kw["ids"], pixel_values=kw["pixel_values"])
        return torch.cat([out.text_embeds, out.image_embeds], 0)
    if kind == "bert":
        return model(kw["ids"]).last_hidden_state
    if kind == "t5":
        return model(input_ids=kw["ids"], decoder_input_ids=kw["ids"][:, :5]).logits
    return model(kw["ids"]).logits


COMPONENTS = {"vit": ("vision",), "clip": ("language", "vision"), "siglip": ("language", "vision"), "t5": ("language",)}


@pytest.mark.parametrize("kind", TEXT + ["bert", "t5", "vit", "clip", "siglip"])
@pytest.mark.parametrize("style", ["houlsby", "parallel"])
def test_identity_init_equals_unpatched(tmp_path, kind, style):
    model = getattr(tiny, kind)(tmp_path)
    kw = {"ids": _ids(), "pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        ref = _forward(model, kind, **kw)
    comps = COMPONENTS.get(kind, ("language",))
    pf.patch(model, {"prefix": None, "lora": {"components": comps}, "adapter": {"style": style, "components": comps}})
    model.eval()
    counts = pf.trainable_parameters(model)
    assert counts["lora"] > 0 and counts["adapter"] > 0 and counts["base"] == 0
    with torch.no_grad():
        out = _forward(model, kind, **kw)
    assert rel_err(out, ref) <= 1e-6
    randomise_peft(model)
    with torch.no_grad():
        assert rel_err(_forward(model, kind, **kw), ref) > 1e-4  # the modules are really in the path


@pytest.mark.parametrize("kind", TEXT + ["bert", "t5"])
def test_prefix_changes_output_and_left_padding_keeps_real_logits(tmp_path, kind):
    model = getattr(tiny, kind)(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = _forward(model, kind, ids=ids)
    pf.patch(model, {"prefix": {"num_tokens": 3}, "lora": None})
    model.eval()
    with torch.no_grad():
        assert rel_err(_forward(model, kind, ids=ids), ref) > 1e-3
    if kind in ("bert", "t5"):
        return
    # a left-padded row gives the same real-token logits as the unpadded row: the prefix is never masked
    pad = 3
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        a = model(padded, attention_mask=mask, position_ids=pos).logits[:, pad:]
        b = model(ids).logits
        # without position_ids too: real tokens keep positions 0..L-1, as generate gives them
        c = model(padded, attention_mask=mask).logits[:, pad:]
    assert rel_err(a, b) <= 1e-5
    assert rel_err(c, b) <= 1e-5


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_right_padding_keeps_real_outputs(tmp_path, kind):
    model = getattr(tiny, kind)(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 2}, "lora": None})
    model.eval()
    ids = _ids(1, 6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        if kind == "bert":
            a = model(padded, attention_mask=mask).last_hidden_state[:, :6]
            b = model(ids).last_hidden_state
        else:
            dec = ids[:, :4]
            a = model(input_ids=padded, attention_mask=mask, decoder_input_ids=dec).logits
            b = model(input_ids=ids, decoder_input_ids=dec).logits
    assert rel_err(a, b) <= 1e-5


def test_prefix_sized_by_kv_heads(tmp_path):
    model = tiny.llama(tmp_path, kv_heads=1)
    pf.patch(model, {"prefix": {"num_tokens": 5, "reparam": "none"}, "lora": None})
    prefix = model.model.layers[0].self_attn.prefix_language
    assert prefix.key.shape == (1, 5, 16) and prefix.value.shape == (1, 5, 16)


@pytest.mark.parametrize("reparam", ["mlp", "mlp-global", "none"])
def test_stages_train_exactly_their_groups(tmp_path, reparam):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 2, "reparam": reparam}, "adapter": {"bottleneck": 4}})
    groups = pf.parameter_groups(model)

    def trained(stage, freeze=False):
        model._ptpeft.config.freeze_prefix = freeze
        pf.set_stage(model, stage)
        return {groups[n] for n, p in model.named_parameters() if p.requires_grad}

    assert trained("prefix") == {"prefix"}
    assert trained("peft") == {"prefix", "lora", "adapter"}
    assert trained("peft", freeze=True) == {"lora", "adapter"}
    assert trained("full") == {"prefix", "lora", "adapter", "base"}
    assert trained("full", freeze=True) == {"lora", "adapter", "base"}
    assert trained("eval") == set() and not model.training
    with pytest.raises(ValueError, match="stage"):
        pf.set_stage(model, "lora")
    # names carry group and component
    prefix_names = [n for n, g in groups.items() if g == "prefix"]
    assert prefix_names and all("prefix_language" in n for n in prefix_names)
    assert all("lora_language" in n for n, g in groups.items() if g == "lora")
    assert all("adapter_language" in n for n, g in groups.items() if g == "adapter")


def test_one_backward_reaches_only_trainable(tmp_path):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 2}})
    pf.set_stage(model, "prefix")
    model(_ids()).logits.sum().backward()
    groups = pf.parameter_groups(model)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (groups[n] == "prefix"), n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("reparam", ["mlp", "mlp-global"])
def test_merge_keeps_outputs_and_unmerge_restores_weights(tmp_path, reparam):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 3, "reparam": reparam}, "lora": {"r": 4}})
    randomise_peft(model)
    model.eval()
    ids = _ids()
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        ref = model(ids).logits
    pf.merge(model)
    assert not any("mlp" in n for n, _ in model.named_parameters() if "prefix" in n)  # MLPs dropped
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) <= 1e-5
    assert rel_err(model.model.layers[0].self_attn.q_proj.weight, w0) > 1e-4
    pf.unmerge(model)
    assert rel_err(model.model.layers[0].self_attn.q_proj.weight, w0) <= 1e-6
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) <= 1e-5


def test_gpt2_conv1d_lora_merge(tmp_path):
    model = tiny.gpt2(tmp_path)
    pf.patch(model, {"prefix": None, "lora": {"r": 4}})
    randomise_peft(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        pf.merge(model)
        assert rel_err(model(ids).logits, ref) <= 1e-5


def test_save_load_roundtrip_and_mismatch_messages(tmp_path):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 3}, "adapter": {"bottleneck": 4}})
    randomise_peft(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    pf.save(model, tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["ptpeft.safetensors", "ptpeft_config.json"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ck" / "ptpeft.safetensors")
    assert saved and all(("prefix_" in k) or ("lora_" in k) or ("adapter_" in k) for k in saved)

    fresh = tiny.llama(tmp_path)  # unpatched: load patches with the saved config
    pf.load(fresh, tmp_path / "ck")
    fresh.eval()
    with torch.no_grad():
        assert rel_err(fresh(ids).logits, ref) <= 1e-6

    other = tiny.llama(tmp_path)
    pf.patch(other, {"prefix": {"num_tokens": 5}, "adapter": {"bottleneck": 4}})
    with pytest.raises(ValueError, match=r"another config than this model's: prefix\.num_tokens: 3 in the checkpoint, "
                                         r"5 in the model\. .*reconfigure=True"):
        pf.load(other, tmp_path / "ck")
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        pf.load(tiny.gpt2(tmp_path), tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="ptpeft_fast.save"):
        pf.load(tiny.llama(tmp_path), tmp_path / "nothing")


def test_load_returns_an_inference_model_unless_asked_for_a_stage(tmp_path):
    """Like PeftModel.from_pretrained: eval mode, nothing trainable, dropout off, so two forwards agree
    (with dropout 0.1 in the saved config they differed by up to 1.36 in the logits)."""
    model = tiny.llama(tmp_path)
    cfg = {"prefix": {"num_tokens": 3, "dropout": 0.1}, "lora": {"r": 4, "dropout": 0.1}}
    pf.patch(model, cfg)
    randomise_peft(model)
    pf.save(model, tmp_path / "ck")
    ids = _ids()

    fresh = pf.load(tiny.llama(tmp_path), tmp_path / "ck")
    assert not fresh.training and fresh._ptpeft.stage == "eval"
    assert pf.trainable_parameters(fresh)["total"] == 0
    assert pf.present_parameters(fresh)["lora"] == pf.present_parameters(model)["lora"] > 0
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, fresh(ids).logits)

    going_on = pf.load(tiny.llama(tmp_path), tmp_path / "ck", stage="peft")
    assert going_on.training and pf.trainable_parameters(going_on)["lora"] > 0
    patched = pf.patch(tiny.llama(tmp_path), cfg)
    pf.set_stage(patched, "peft")
    pf.load(patched, tmp_path / "ck", stage=None)  # keeps the stage it had
    assert patched._ptpeft.stage == "peft" and patched.training
    with pytest.raises(ValueError, match=r"load\(stage='train'\): not one of"):
        pf.load(tiny.llama(tmp_path), tmp_path / "ck", stage="train")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 2}, "lora": None})
    pf.save(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "ptpeft.safetensors").read_bytes()
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError):
        pf.save(model, tmp_path / "ck")
    monkeypatch.undo()
    assert (tmp_path / "ck" / "ptpeft.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ptpeft.safetensors", "ptpeft_config.json"]


def test_unsupported_model_lists_supported_and_hand_targets_work(tmp_path):
    from transformers import OlmoConfig, OlmoForCausalLM

    cfg = OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=tiny.VOCAB)
    model = OlmoForCausalLM(cfg).eval()
    with pytest.raises(ValueError) as e:
        pf.patch(model)
    assert "llama" in str(e.value) and "blip_2" in str(e.value) and "targets" in str(e.value)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    pf.patch(model, {"prefix": {"num_tokens": 2}, "lora": {"targets": ["q_proj", "v_proj"]},
                     "targets": {"layers": r"layers\.\d+", "attention": ["self_attn"]}})
    assert pf.trainable_parameters(model)["prefix"] > 0
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) > 1e-3


def test_patch_twice_and_bad_targets(tmp_path):
    model = tiny.llama(tmp_path)
    with pytest.raises(ValueError, match="match no linear layer.*q_proj"):
        pf.patch(model, {"prefix": {"num_tokens": 2}, "lora": {"targets": ["query"]}})
    # a failed patch leaves the model untouched, so it can be patched again
    assert not any(isinstance(m, LayerPrefix) for m in model.modules())
    pf.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        pf.patch(model)
    with pytest.raises(ValueError, match="component 'vision' does not exist"):
        pf.patch(tiny.llama(tmp_path), {"prefix": {"components": ["vision"]}})


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_greedy_generate_equals_stepwise_argmax_with_left_padding(tmp_path, kind):
    model = getattr(tiny, kind)(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 3}, "lora": {"r": 4}})
    randomise_peft(model)
    model.eval()
    ids = _ids(2, 5)
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:1]], 0)[:, :5]
    ids[1] = _ids(1, 5, seed=3)[0]
    mask = torch.ones_like(ids)
    ids[0, :2] = 0
    mask[0, :2] = 0  # row 0 is left-padded
    calls = {"n": 0}
    orig = LayerPrefix._compute

    def counting(self):
        calls["n"] += 1
        return orig(self)

    LayerPrefix._compute = counting
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        LayerPrefix._compute = orig
    n_layers = len(model._ptpeft.prefix_layers)
    assert calls["n"] == n_layers  # the prefix is computed once per generate call
    # step-by-step full forward passes (no cache), per row without padding
    for row in range(2):
        seq = ids[row][mask[row].bool()].unsqueeze(0)
        for _ in range(6):
            with torch.no_grad():
                nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(out[row, -6:], seq[0, -6:]), (row, out[row], seq)


def test_beam_search_batch_equals_rows_and_cache_holds_real_tokens(tmp_path):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 4}})
    model.eval()
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    ids[0, :2] = 0
    mask[0, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    for row in range(2):
        seq = ids[row][mask[row].bool()].unsqueeze(0)
        single = model.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=4, num_beams=3,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, -4:], single[0, -4:])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert cache.get_seq_length() == ids.shape[1]  # only real tokens in the cache, no prefix


@pytest.mark.parametrize("stage", ["prefix", "peft"])
def test_gradient_checkpointing_gives_same_gradients(tmp_path, stage):
    def grads(checkpointing):
        model = tiny.llama(tmp_path)
        torch.manual_seed(3)
        pf.patch(model, {"prefix": {"num_tokens": 3}, "adapter": {"bottleneck": 4}})
        randomise_peft(model)
        pf.set_stage(model, stage)
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(_ids(), labels=_ids()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert b[n] is not None and rel_err(b[n], a[n]) <= 1e-5, n
