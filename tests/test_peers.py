"""Equivalence with PEFT, the peer our users come from: same weights → same logits and gradients."""
import copy

import pytest
import torch

import ptpeft_fast as pf

import tiny
from tiny import rel_err

peft = pytest.importorskip("peft")


def _ids(b=2, length=9):
    g = torch.Generator().manual_seed(11)
    return torch.randint(1, tiny.VOCAB - 1, (b, length), generator=g)


@pytest.mark.parametrize("kind, targets", [("llama", ["q_proj", "v_proj", "o_proj"]), ("gpt2", ["c_attn"])])
def test_lora_matches_peft_logits_and_gradients(tmp_path, kind, targets):
    base = getattr(tiny, kind)(tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       lora_dropout=0.0, fan_in_fan_out=kind == "gpt2"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = pf.patch(copy.deepcopy(base), {"prefix": None, "lora": {"r": 4, "alpha": 8, "targets": targets}})
    # copy PEFT's factors into ours, by layer path
    theirs_p = dict(theirs.named_parameters())
    n_copied = 0
    with torch.no_grad():
        for path, layer in ours._ptpeft.lora_layers.items():
            lora = getattr(layer, layer._ptpeft_lora)
            lora.lora_A.copy_(theirs_p[f"base_model.model.{path}.lora_A.default.weight"])
            lora.lora_B.copy_(theirs_p[f"base_model.model.{path}.lora_B.default.weight"])
            n_copied += 1
    assert n_copied == len([n for n in theirs_p if "lora_A" in n])
    ids = _ids()
    theirs.eval(), ours.eval()  # no dropout: GPT-2 has residual/attention dropout
    lt = theirs(ids, labels=ids)
    lo = ours(ids, labels=ids)
    assert rel_err(lo.logits, lt.logits) <= 1e-5
    lt.loss.backward()
    lo.loss.backward()
    for path, layer in ours._ptpeft.lora_layers.items():
        lora = getattr(layer, layer._ptpeft_lora)
        assert rel_err(lora.lora_A.grad, theirs_p[f"base_model.model.{path}.lora_A.default.weight"].grad) <= 1e-5
        assert rel_err(lora.lora_B.grad, theirs_p[f"base_model.model.{path}.lora_B.default.weight"].grad) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_tuning_matches_peft_with_shifted_positions(tmp_path, kind):
    base = getattr(tiny, kind)(tmp_path)  # llama has GQA (4 query heads, 2 kv heads)
    P = 4
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    emb = theirs.prompt_encoder["default"].embedding.weight  # [P, layers*2*Hkv*D]
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(4)))
    ours = pf.patch(copy.deepcopy(base),
                    {"prefix": {"num_tokens": P, "reparam": "none", "positions": "shift"}, "lora": None})
    layers = list(ours._ptpeft.prefix_layers.values())
    hkv, d = layers[0].kv_heads, layers[0].head_dim
    view = emb.detach().view(P, len(layers) * 2, hkv, d)
    with torch.no_grad():
        for i, prefix in enumerate(layers):
            prefix.key.copy_(view[:, 2 * i].permute(1, 0, 2))
            prefix.value.copy_(view[:, 2 * i + 1].permute(1, 0, 2))
    theirs.eval(), ours.eval()
    ids = _ids()
    lt = theirs(ids, labels=ids)
    lo = ours(ids, labels=ids)
    assert rel_err(lo.logits, lt.logits) <= 1e-5
    # and the gradients w.r.t. the prefix agree
    lt.loss.backward()
    lo.loss.backward()
    gview = emb.grad.view(P, len(layers) * 2, hkv, d)
    for i, prefix in enumerate(layers):
        assert rel_err(prefix.key.grad, gview[:, 2 * i].permute(1, 0, 2)) <= 1e-5
        assert rel_err(prefix.value.grad, gview[:, 2 * i + 1].permute(1, 0, 2)) <= 1e-5
