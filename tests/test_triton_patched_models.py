"""Patched tiny Llama and tiny BLIP-2: same loss and gradients with the Triton kernels as with the
torch reference path, and the kernels really run (interpreter on CPU, or compiled on CUDA with the
interpreter off: the model and inputs move to triton_test_utils.DEVICE)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ptpeft_fast as pf  # noqa: E402
from ptpeft_fast import ops  # noqa: E402
from ptpeft_fast.ops import triton_ops  # noqa: E402

import tiny  # noqa: E402
from tiny import IMAGE_TOKEN, randomise_peft  # noqa: E402
from triton_test_utils import count_triton_calls, dev, fast_interpreter, needs_triton_device, rel_err  # noqa: E402,F401

pytestmark = needs_triton_device


def _loss_and_grads(model, kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             kw["input_ids"][:, 1:].reshape(-1) % logits.shape[-1])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _compare(model, kw, monkeypatch, expect):
    model, kw = dev(model), {k: dev(v) for k, v in kw.items()}
    with ops.use_backend("torch"):  # the reference (on CUDA "auto" would pick Triton itself)
        loss_t, grads_t = _loss_and_grads(model, kw)
    counts = count_triton_calls(monkeypatch)
    with ops.use_backend("triton"), triton_ops.poison_outputs():
        loss_k, grads_k = _loss_and_grads(model, kw)
    for name in expect:
        assert counts[name] > 0, f"{name} never reached Triton: {counts}"
    assert rel_err(loss_k, loss_t) <= 1e-5
    assert grads_t.keys() == grads_k.keys() and len(grads_t) > 0
    for n in grads_t:
        assert rel_err(grads_k[n], grads_t[n]) <= 1e-4, n


def test_patched_llama_same_loss_and_grads(tmp_path, monkeypatch):
    model = tiny.llama(tmp_path, kv_heads=2, layers=2)
    pf.patch(model, {"prefix": {"num_tokens": 3, "hidden_size": 16}, "lora": {"r": 4},
                     "adapter": {"bottleneck": 8, "activation": "gelu"}})
    randomise_peft(model)
    pf.set_stage(model, "peft")
    model.eval()  # no dropout: the torch and Triton runs see the same function
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, tiny.VOCAB - 1, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the mask reaches the kernel as key ranges
    _compare(model, dict(input_ids=ids, attention_mask=mask), monkeypatch,
             ["prefix_attention", "lora_linear", "adapter"])


def test_patched_blip2_same_loss_and_grads(tmp_path, monkeypatch):
    model = tiny.blip2(tmp_path, "opt")
    pf.patch(model, {"prefix": {"num_tokens": 3, "hidden_size": 16, "components": ["vision", "qformer", "language"]},
                     "lora": {"r": 2, "components": ["language", "qformer"]}})
    randomise_peft(model)
    pf.set_stage(model, "peft")
    model.eval()
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 16, 16, generator=g)
    ids = torch.randint(1, tiny.VOCAB - 2, (2, 5), generator=g)
    ids = torch.cat([torch.full((2, 4), IMAGE_TOKEN), ids], 1)
    kw = dict(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids))
    _compare(model, kw, monkeypatch, ["prefix_attention", "lora_linear"])
