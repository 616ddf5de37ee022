"""from_peft / to_peft against real PEFT models: same logits, same gradients, clear errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import ptpeft_fast as pf
from ptpeft_fast.interop import PeftInteropError, from_peft, to_peft
from ptpeft_fast.tuners.lora import lora_of

from _tiny_models import batch, blip2_inputs, greedy_by_forward, load, logits, randomize, real

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= tol, rel


def weighted_loss(model, ids, mask) -> torch.Tensor:
    """A random linear function of the logits at real tokens (pad positions do not count)."""
    out = model(input_ids=ids, attention_mask=mask).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) * mask.unsqueeze(-1)
    return (out * w).sum()


# ---------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("kind,extra", [("llama", {}), ("gpt2", {"use_rslora": True})])
def test_lora_from_peft_same_logits_and_gradients(kind, extra, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2: PEFT switches fan_in_fan_out on for Conv1D
        pm = get_peft_model(load(kind), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                       init_lora_weights=False, **extra))
    pm.save_pretrained(tmp_path)
    ours = from_peft(load(kind), tmp_path)
    assert ours._ptpeft.config.prefix is None and ours._ptpeft.config.lora.r == 4
    ids, mask = batch()
    pm.eval(), ours.eval()
    assert_close(logits(ours, ids, mask), logits(pm, ids, mask))

    pf.set_stage(ours, "peft")
    pm.train()
    weighted_loss(ours, ids, mask).backward()
    weighted_loss(pm, ids, mask).backward()
    assert ours._ptpeft.lora_layers
    for path, layer in ours._ptpeft.lora_layers.items():
        mine = lora_of(layer)
        theirs = pm.get_submodule("base_model.model." + path)
        assert_close(mine.lora_A.grad, theirs.lora_A["default"].weight.grad)
        assert_close(mine.lora_B.grad, theirs.lora_B["default"].weight.grad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_to_peft_loads_in_peft_with_identical_outputs(kind, tmp_path):
    ours = pf.patch(load(kind), pf.PTPeftConfig(prefix=None, lora=pf.LoraConfig(r=4, alpha=12)))
    randomize(ours, "lora_B")
    ours.eval()
    out = to_peft(ours, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load(kind), out).eval()
    ids, mask = batch(1)
    assert_close(logits(pm, ids, mask), logits(ours, ids, mask))
    # and back: the round trip is exact
    again = from_peft(load(kind), out)
    for path, layer in ours._ptpeft.lora_layers.items():
        assert torch.equal(lora_of(again._ptpeft.lora_layers[path]).lora_B, lora_of(layer).lora_B)


def test_lora_into_already_patched_model_keeps_prefix(tmp_path):
    torch.manual_seed(1)
    pm = get_peft_model(load(), PeftLoraConfig(r=8, lora_alpha=16,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                               init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    ours = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, hidden_size=8), lora=pf.LoraConfig()))
    before = {n: p.clone() for n, p in ours.named_parameters() if "prefix" in n}
    from_peft(ours, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if "prefix" in n)
    layer = ours._ptpeft.lora_layers["model.layers.0.self_attn.q_proj"]
    want = pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_B["default"].weight
    assert torch.equal(lora_of(layer).lora_B, want)


def test_unsupported_lora_options_are_refused(tmp_path):
    pm = get_peft_model(load(), PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftInteropError, match="use_dora"):
        from_peft(load(), tmp_path)


def test_from_peft_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        from_peft(load(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(PeftInteropError, match="IA3"):
        from_peft(load(), tmp_path)
    with pytest.raises(PeftInteropError, match="PeftModel"):
        from_peft(get_peft_model(load(), PeftLoraConfig(r=2, target_modules=["q_proj"])), tmp_path)


# ---------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("kind,projection", [("llama", False), ("llama", True), ("gpt2", False)])
def test_prefix_from_peft_dir_same_logits_and_generation(kind, projection, tmp_path):
    torch.manual_seed(2)
    pm = get_peft_model(load(kind), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                       prefix_projection=projection, encoder_hidden_size=16)).eval()
    pm.save_pretrained(tmp_path)
    ours = from_peft(load(kind), tmp_path)
    pc = ours._ptpeft.config.prefix
    # PEFT saves only the projected K/V even with prefix_projection: static prefix
    assert (pc.reparam, pc.positions, pc.num_tokens) == ("none", "shift", 3)
    ours.eval()
    ids, mask = batch(3, pad="right")  # see _tiny_models.batch
    assert_close(real(logits(ours, ids, mask), mask), real(logits(pm, ids, mask), mask))
    if kind == "gpt2":  # absolute positions (wpe) shifted like PEFT's; and back to PEFT
        pm2 = PeftModel.from_pretrained(load(kind), to_peft(ours, tmp_path / "back")).eval()
        assert_close(real(logits(pm2, ids, mask), mask), real(logits(ours, ids, mask), mask))
    elif not projection:
        # PEFT's prefix `generate` is no oracle: on transformers >= 5.24 its scores disagree with
        # PEFT's own forward (docs/peers.md). Ours, on a left-padded batch, must equal greedy
        # decoding by our full forward, row by row; PEFT is compared by its forward pass on the
        # sequences generated.
        ids, mask = batch(3)
        steps = 4
        with torch.no_grad():
            out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                pad_token_id=0)
        for row in range(ids.shape[0]):
            ref = greedy_by_forward(ours, ids[row][mask[row].bool()].unsqueeze(0), steps)
            assert torch.equal(out[row, -steps:], ref[0, -steps:]), (row, out[row], ref)
            full = torch.ones_like(ref)
            assert_close(logits(ours, ref, full), logits(pm, ref, full))


def test_prefix_projection_from_peft_model_is_mlp_global_with_same_gradients():
    torch.manual_seed(3)
    pm = get_peft_model(load(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                   prefix_projection=True, encoder_hidden_size=16))
    ours = from_peft(load(), pm)
    assert ours._ptpeft.config.prefix.reparam == "mlp-global"
    ids, mask = batch(4, pad="right")
    pm.eval(), ours.eval()
    assert_close(real(logits(ours, ids, mask), mask), real(logits(pm, ids, mask), mask))
    pf.set_stage(ours, "prefix")
    pm.train()
    weighted_loss(ours, ids, mask).backward()
    weighted_loss(pm, ids, mask).backward()
    shared = ours.get_submodule("prefix_language")
    enc = pm.prompt_encoder["default"]
    token_dim = enc.embedding.weight.shape[1]  # Hkv·D = 32 < H·D = 64 (GQA): our copy is zero-padded
    assert_close(shared.mlp_out.weight.grad, enc.transform[2].weight.grad)
    assert_close(shared.mlp_in.weight.grad[:, :token_dim], enc.transform[0].weight.grad)
    assert_close(shared.embedding.grad[:, :token_dim], enc.embedding.weight.grad)
    assert not shared.mlp_in.weight.grad[:, token_dim:].any() and not shared.embedding.grad[:, token_dim:].any()


def test_prefix_to_peft_identical_outputs_and_clear_refusals(tmp_path):
    cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=4, reparam="none", positions="shift", init_std=0.5),
                          lora=None)
    ours = pf.patch(load(), cfg).eval()
    out = to_peft(ours, tmp_path / "a")
    pm = PeftModel.from_pretrained(load(), out).eval()
    ids, mask = batch(5, pad="right")
    assert_close(real(logits(pm, ids, mask), mask), real(logits(ours, ids, mask), mask))

    # positions="keep" (the default) on a RoPE model: the keys are rotated by P on export, and PEFT's
    # forward equals ours on unpadded and right-padded rows (PEFT numbers a left-padded row from its pad)
    keep = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3, reparam="none", init_std=0.5),
                                            lora=None)).eval()
    pm = PeftModel.from_pretrained(load(), to_peft(keep, tmp_path / "b")).eval()
    assert_close(real(logits(pm, ids, mask), mask), real(logits(keep, ids, mask), mask))
    unpadded = ids[:1, : int(mask[0].sum())]
    assert_close(pm(input_ids=unpadded).logits, keep(input_ids=unpadded).logits)
    # learned absolute positions cannot be converted: refused at export, with the fix
    learned = pf.patch(load("gpt2"), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, reparam="none"), lora=None))
    with pytest.raises(PeftInteropError, match="positions='keep'.*not rotary.*positions='shift'"):
        to_peft(learned, tmp_path / "b2")

    mlp = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, hidden_size=8, positions="shift"),
                                           lora=None))
    mlp.eval()
    with pytest.raises(PeftInteropError, match="static_prefix=True"):
        to_peft(mlp, tmp_path / "c")
    before = {n: p.clone() for n, p in mlp.named_parameters()}
    to_peft(mlp, tmp_path / "c", static_prefix=True)
    assert all(torch.equal(p, before[n]) for n, p in mlp.named_parameters())  # the model is not changed
    pm = PeftModel.from_pretrained(load(), tmp_path / "c").eval()
    assert_close(real(logits(pm, ids, mask), mask), real(logits(mlp, ids, mask), mask))


def test_to_peft_refuses_ambiguous_or_merged(tmp_path):
    both = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, reparam="none", positions="shift"),
                                            lora=pf.LoraConfig(r=2)))
    with pytest.raises(PeftInteropError,
                       match="PEFT cannot run together.*save_merged.*adapter='lora' or adapter='prefix'"):
        to_peft(both, tmp_path)
    with pytest.warns(UserWarning, match="not in the PEFT"):
        to_peft(both, tmp_path / "lora", adapter="lora")
    pf.merge(both)
    with pytest.raises(PeftInteropError, match="unmerge"):
        to_peft(both, tmp_path / "lora2", adapter="lora")


def test_prefix_checkpoint_for_other_base_model_is_refused(tmp_path):
    pm = get_peft_model(load("gpt2"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.save_pretrained(tmp_path)
    with pytest.raises((PeftInteropError, ValueError), match="prefix|layers|shape"):
        from_peft(load("llama"), tmp_path)


def test_lora_adapter_of_another_base_model_is_refused(tmp_path):
    pm = get_peft_model(load("llama"), PeftLoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftInteropError, match="another base model"):
        from_peft(load("gpt2"), tmp_path)


def test_blip2_lora_in_three_components_from_and_to_peft(tmp_path):
    """Multimodal: one PEFT adapter on the vision tower, the Q-Former and the OPT language model."""
    torch.manual_seed(4)
    targets = (r".*(language_model.*\.(q_proj|v_proj)"
               r"|qformer\.encoder\.layer\.\d+\.attention\.attention\.(query|value)"
               r"|vision_model.*\.qkv)")
    pm = get_peft_model(load("blip2"), PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=targets))
    pm.save_pretrained(tmp_path / "in")
    ours = from_peft(load("blip2"), tmp_path / "in").eval()
    assert set(ours._ptpeft.config.lora.components) == {"vision", "qformer", "language"}
    pm.eval()
    inputs = blip2_inputs(ours)
    with torch.no_grad():
        ref = pm(**inputs).logits
        assert_close(ours(**inputs).logits, ref)
        back = PeftModel.from_pretrained(load("blip2"), to_peft(ours, tmp_path / "out")).eval()
        assert_close(back(**inputs).logits, ref)
    # Q-Former cross-attention is outside ptpeft_fast's qformer component: refused, not dropped
    pm = get_peft_model(load("blip2"), PeftLoraConfig(r=2, target_modules=r".*crossattention\.attention\.query"))
    pm.save_pretrained(tmp_path / "cross")
    with pytest.raises(PeftInteropError, match="outside every component"):
        from_peft(load("blip2"), tmp_path / "cross")
