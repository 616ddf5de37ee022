"""ptpeft_fast.disabled(model): a patched model computes what the unpatched one does."""
import pytest
import torch

import ptpeft_fast as pf

import tiny
from tiny import randomise_peft, rel_err


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, tiny.VOCAB - 1, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row: the position hooks must be off too
    return ids, mask


@pytest.mark.parametrize("kind,positions,style", [("llama", "shift", "houlsby"), ("llama", "keep", "parallel"),
                                                  ("gpt2", "shift", "pfeiffer"), ("qwen2", "keep", "pfeiffer")])
def test_disabled_equals_unpatched_and_restores(tmp_path, kind, positions, style):
    model = getattr(tiny, kind)(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    pf.patch(model, {"prefix": {"num_tokens": 4, "positions": positions}, "lora": {}, "adapter": {"style": style}})
    randomise_peft(model)
    model.eval()
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
        assert rel_err(patched, ref) > 1e-3  # every module really changes the output
        with pf.disabled(model):
            with pf.disabled(model):  # nesting is harmless
                inner = model(ids, attention_mask=mask).logits
            off = model(ids, attention_mask=mask).logits
        again = model(ids, attention_mask=mask).logits
    assert rel_err(inner, ref) <= 1e-6 and rel_err(off, ref) <= 1e-6
    assert rel_err(again, patched) <= 1e-6  # everything back on after the block


def test_disabled_restores_after_an_exception(tmp_path):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": {"num_tokens": 3}, "lora": {}})
    with pytest.raises(RuntimeError, match="boom"):
        with pf.disabled(model):
            raise RuntimeError("boom")
    state = model._ptpeft
    assert not state.disabled and all(p.enabled for p in state.prefix_layers.values())


def test_disabled_refuses_merged_lora(tmp_path):
    model = tiny.llama(tmp_path)
    pf.patch(model, {"prefix": None, "lora": {}})
    pf.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with pf.disabled(model):
            pass


def test_disabled_generate_equals_unpatched(tmp_path):
    model = tiny.llama(tmp_path)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    pf.patch(model, {"prefix": {"num_tokens": 4}, "lora": {}})
    randomise_peft(model)
    pf.set_stage(model, "eval")
    with pf.disabled(model):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
