"""The fused training loss of a patched model (ptpeft_fast/fused_loss.py) equals transformers' own
(``fused_loss=False``): the loss and every trainable gradient, for every family it covers, with
gradient accumulation's ``num_items_in_batch``; the logits are not computed in training (None),
and are as before in eval mode; families it does not cover keep transformers' loss and say so."""
from __future__ import annotations

import warnings

import pytest
import test_families as fam
import torch

import ptpeft_fast as pf
from ptpeft_fast.fused_loss import FUSED_MODEL_TYPES

import tiny

PAD = fam.PAD
TEXT_KINDS = ["llama", "mistral", "qwen2", "gpt2", "opt"]
FUSED_SPECS = [s for s in fam.SPECS if s.model_type in FUSED_MODEL_TYPES]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _labels(inputs):
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[:, : labels.shape[1] // 3] = -100  # an unsupervised prompt
    return labels


def _run(model, inputs, fused, **extra):
    """(loss, {name: grad}) of one training forward of the patched ``model``."""
    pf.patch(model, pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3), lora=pf.LoraConfig(r=4),
                                    fused_loss=fused))
    pf.set_stage(model, "peft")
    model.train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    torch.manual_seed(0)  # the same dropout masks in both arms (InstructBLIP's Q-Former has dropout)
    out = model(**inputs, labels=_labels(inputs), **extra)
    assert (out.logits is None) == fused
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _compare(make_model, make_inputs, **extra):
    inputs = make_inputs()
    loss_f, grads_f = _run(make_model(), inputs, True, **extra)
    loss_u, grads_u = _run(make_model(), inputs, False, **extra)
    assert _rel(loss_f, loss_u) <= 1e-5, (float(loss_f), float(loss_u))
    assert grads_f.keys() == grads_u.keys() and grads_f
    for name in grads_u:
        assert _rel(grads_f[name], grads_u[name]) <= 1e-5, name


@pytest.mark.parametrize("spec", FUSED_SPECS, ids=[s.id for s in FUSED_SPECS])
def test_multimodal_and_text_families_match_transformers_loss(spec):
    _compare(lambda: fam.build(spec), lambda: fam.make_inputs(spec, fam.build(spec)))


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_text_families_match_transformers_loss(kind, tmp_path):
    ids = torch.randint(3, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    _compare(lambda: getattr(tiny, kind)(tmp_path), lambda: {"input_ids": ids, "attention_mask": mask})


def test_blip2_labels_cover_the_text_after_the_query_tokens(tmp_path):
    from _tiny_models import blip2_inputs, load

    _compare(lambda: load("blip2"), lambda: blip2_inputs(load("blip2")))


def test_gradient_accumulation_normalises_by_num_items_in_batch(tmp_path):
    ids = torch.randint(3, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    _compare(lambda: tiny.llama(tmp_path), lambda: {"input_ids": ids, "attention_mask": mask},
             num_items_in_batch=torch.tensor(23))


def test_eval_mode_and_no_labels_compute_the_logits(tmp_path):
    model = pf.patch(tiny.llama(tmp_path), pf.PTPeftConfig())
    ids = torch.randint(3, tiny.VOCAB, (2, 6))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        assert out.logits is not None and out.logits.shape[-2] == 6 and out.loss is not None
    model.train()
    assert model(input_ids=ids).logits is not None  # no labels: nothing to fuse
    with pf.disabled(model):
        assert model(input_ids=ids, labels=ids).logits is not None  # the unpatched model exactly


def test_families_it_does_not_cover_keep_transformers_loss_and_say_so(tmp_path):
    model = tiny.t5(tmp_path)
    with pytest.warns(UserWarning, match="fused_loss: T5ForConditionalGeneration keeps transformers' loss"):
        pf.patch(model, pf.PTPeftConfig(prefix=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pf.patch(tiny.llama(tmp_path), pf.PTPeftConfig())
        pf.patch(tiny.bert(tmp_path), pf.PTPeftConfig(prefix=None))  # no LM head: nothing to say


def test_the_fused_loss_compiles_as_one_graph(tmp_path):
    model = pf.patch(tiny.llama(tmp_path), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2)))
    pf.set_stage(model, "peft")
    model.train()
    ids = torch.randint(3, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    eager = model(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()  # earlier tests' compiles of the same model code must not hit the recompile limit
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, labels=ids)
    assert out.logits is None and _rel(out.loss.detach(), eager.detach()) <= 1e-6
