"""Tiny BLIP-2 (OPT and T5 language models): prefixes in vision, Q-Former and language."""
import pytest
import torch

import ptpeft_fast as pf

import tiny
from tiny import IMAGE_TOKEN, rel_err


def _inputs(text):
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 16, 16, generator=g)
    ids = torch.randint(1, tiny.VOCAB - 2, (2, 5), generator=g)
    ids = torch.cat([torch.full((2, 4), IMAGE_TOKEN), ids], 1)
    mask = torch.ones_like(ids)
    kw = dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
    if text == "t5":
        kw["decoder_input_ids"] = ids[:, 4:]
    return kw


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_prefixes_everywhere_get_gradients_and_nothing_frozen_does(tmp_path, text):
    model = tiny.blip2(tmp_path, text)
    pf.patch(model, {"prefix": {"num_tokens": 3, "components": ["vision", "qformer", "language"]},
                     "lora": {"r": 2, "components": ["language", "projector"]}})
    paths = list(model._ptpeft.prefix_layers)
    assert any(p.startswith("vision_model.") for p in paths)
    assert any(p.startswith("qformer.") for p in paths)
    assert any(p.startswith("language_model.") for p in paths)
    if text == "t5":
        assert any("EncDecAttention" in p for p in paths)  # language = encoder + decoder + cross-attention
    pf.set_stage(model, "prefix")
    model.train()
    out = model(**_inputs(text))
    out.logits.float().pow(2).mean().backward()
    groups = pf.parameter_groups(model)
    prefix_params = [n for n, g in groups.items() if g == "prefix"]
    for n, p in model.named_parameters():
        if groups[n] == "prefix":
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert len(prefix_params) >= 4 * len(paths)


def test_identity_init_equals_unpatched_in_every_component(tmp_path):
    model = tiny.blip2(tmp_path, "opt")
    kw = _inputs("opt")
    with torch.no_grad():
        ref = model(**kw).logits
    pf.patch(model, {"prefix": None, "lora": {"components": ["vision", "qformer", "language", "projector"]},
                     "adapter": {"bottleneck": 4, "components": ["vision", "qformer", "language"]}})
    model.eval()
    with torch.no_grad():
        assert rel_err(model(**kw).logits, ref) <= 1e-6


def test_generate_with_prefix_left_padded(tmp_path):
    model = tiny.blip2(tmp_path, "opt")
    pf.patch(model, {"prefix": {"num_tokens": 2, "components": ["qformer", "language"]}})
    model.eval()
    kw = _inputs("opt")
    kw["input_ids"][0, -2:] = kw["input_ids"][0, -4:-2].clone()
    ids, mask = kw["input_ids"].clone(), kw["attention_mask"].clone()
    # left-pad row 0 by two tokens
    ids = torch.cat([torch.zeros(2, 2, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), mask], 1)
    ids[1, :2] = ids[1, 2:4]
    ids[1] = torch.cat([kw["input_ids"][1], kw["input_ids"][1, -2:]])
    mask[1] = 1
    out = model.generate(pixel_values=kw["pixel_values"], input_ids=ids, attention_mask=mask, max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    for row in range(2):
        seq = ids[row][mask[row].bool()].unsqueeze(0)
        pv = kw["pixel_values"][row:row + 1]
        for _ in range(4):
            with torch.no_grad():
                logits = model(pixel_values=pv, input_ids=seq, attention_mask=torch.ones_like(seq),
                               use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[row, -4:], seq[0, -4:])


def test_projector_takes_lora_but_no_prefix(tmp_path):
    import pytest

    model = tiny.blip2(tmp_path, "opt")
    with pytest.raises(ValueError, match="'projector' has no attention layers"):
        pf.patch(model, {"prefix": {"components": ["projector"]}})
    pf.patch(model, {"prefix": None, "lora": {"components": ["projector"]}})
    assert list(model._ptpeft.lora_layers) == ["language_projection"]
