"""``ptpeft_fast.load_prefix``: a prefix-tuned stage 1 (saved from a model patched with the prefix
alone) loaded into a model patched with the prefix and LoRA or adapters, as stage 2 starts."""
from __future__ import annotations

import pytest
import torch

import ptpeft_fast as pf

from _tiny_models import batch, load, logits, randomize


def _prefix_only(seed: int = 0):
    model = load("llama")
    pf.patch(model, pf.PTPeftConfig(prefix={"num_tokens": 3, "hidden_size": 8}, lora=None))
    randomize(model, "prefix", std=0.3, seed=seed)  # a trained-looking prefix
    return model


@pytest.mark.parametrize("second", ["lora", "adapter"])
def test_prefix_is_loaded_and_the_rest_is_untouched(tmp_path, second):
    src = _prefix_only()
    pf.save(src, tmp_path / "stage1")
    model = load("llama")
    cfg = {"prefix": {"num_tokens": 3, "hidden_size": 8}, "lora": {"r": 4} if second == "lora" else None,
           "adapter": {"bottleneck": 4} if second == "adapter" else None}
    pf.patch(model, pf.PTPeftConfig(**cfg))
    pf.set_stage(model, "peft")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert pf.load_prefix(model, tmp_path / "stage1") is model
    src_params = dict(src.named_parameters())
    assert sum("prefix" in n for n in src_params) >= 2  # the MLP's weights (the test compares them)
    for n, p in model.named_parameters():
        if n in src_params and "prefix" in n:
            assert torch.equal(p, src_params[n]), n
        else:
            assert torch.equal(p, before[n]), n  # LoRA/adapter and base weights as they were
    assert any(p.requires_grad for n, p in model.named_parameters() if second in n)  # the stage is kept
    # LoRA B / adapter up start at zero: the model computes what the prefix-only model did
    ids, mask = batch()
    model.eval()
    torch.testing.assert_close(logits(model, ids, mask), logits(src.eval(), ids, mask), rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem(tmp_path):
    src = _prefix_only()
    pf.save(src, tmp_path / "stage1")
    with pytest.raises(ValueError, match="needs a patched model"):
        pf.load_prefix(load("llama"), tmp_path / "stage1")
    other = load("llama")
    pf.patch(other, pf.PTPeftConfig(prefix={"num_tokens": 5, "hidden_size": 8}, lora={"r": 4}))
    with pytest.raises(ValueError, match="prefix.num_tokens: 3 in the checkpoint, 5 in the model"):
        pf.load_prefix(other, tmp_path / "stage1")
    both = load("llama")
    pf.patch(both, pf.PTPeftConfig(prefix={"num_tokens": 3, "hidden_size": 8}, lora={"r": 4}))
    pf.save(both, tmp_path / "both")
    with pytest.raises(ValueError, match="not this model's prefix"):
        pf.load_prefix(both, tmp_path / "both")
    no_prefix = load("llama")
    pf.patch(no_prefix, pf.PTPeftConfig(prefix=None, lora={"r": 4}))
    with pytest.raises(ValueError, match="both need one"):
        pf.load_prefix(no_prefix, tmp_path / "stage1")
