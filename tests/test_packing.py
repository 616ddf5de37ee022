"""Packed batches through a patched model: a packed row gives every document the logits, the loss
and the gradients it gets alone (prefix + LoRA and prefix + Adapter, GQA and MQA, ``keep`` and
``shift``, both ways transformers delivers a packed row), through the varlen op, never the dense
mask; models that cannot pack refuse with the reason."""
from __future__ import annotations

import copy

import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast import attention, ops, packing

VOCAB = 97


def _llama(Hkv: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=Hkv, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _patched(base, *, P=4, positions="keep", adapter=False):
    cfg = {"prefix": {"num_tokens": P, "positions": positions}}
    cfg.update({"adapter": {"bottleneck": 8}} if adapter else {"lora": {"r": 4}})
    m = pf.patch(copy.deepcopy(base), cfg)
    pf.set_stage(m, "peft")
    with torch.no_grad():  # a trained-looking model: LoRA B / adapter up are zero at init
        g = torch.Generator().manual_seed(5)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _packed(docs, form: str) -> dict:
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    # transformers' collator: each document's first label is -100 (no prediction across documents)
    labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]
    kw = {"input_ids": ids, "position_ids": pos, "labels": labels}
    if form == "flash_kwargs":
        cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
        longest = max(len(d) for d in docs)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kw


def _docs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _separate_logits(m, docs):
    return torch.cat([m(d[None]).logits for d in docs], 1)


def _separate_loss(m, docs):
    """The packed loss's value from the documents alone: the mean over every document's targets."""
    total, count = 0.0, 0
    for d in docs:
        if len(d) < 2:
            continue
        loss = m(d[None], labels=d[None]).loss
        total = total + loss * (len(d) - 1)
        count += len(d) - 1
    return total / count


@pytest.fixture
def spy(monkeypatch):
    """Records whether each prefix attention call got offsets, and every dense mask built."""
    seen = {"cu": [], "masks": 0}
    real_op = attention.ops.prefix_attention

    def op(*a, cu_seqlens=None, **kw):
        seen["cu"].append(cu_seqlens is not None)
        return real_op(*a, cu_seqlens=cu_seqlens, **kw)

    from transformers.masking_utils import sdpa_mask

    def mask(*a, **kw):
        seen["masks"] += 1
        return sdpa_mask(*a, **kw)

    monkeypatch.setattr(attention.ops, "prefix_attention", op)
    monkeypatch.setattr("transformers.masking_utils.sdpa_mask", mask)
    return seen


@pytest.mark.parametrize("form", ["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("positions", ["keep", "shift"])
@pytest.mark.parametrize("Hkv", [2, 1], ids=["GQA", "MQA"])
def test_packed_logits_equal_documents_alone(Hkv, positions, form, spy):
    m = _patched(_llama(Hkv), positions=positions)
    docs = _docs((5, 1, 9, 7))
    with torch.no_grad():
        packed = m(**{k: v for k, v in _packed(docs, form).items() if k != "labels"}).logits
        alone = _separate_logits(m, docs)
    assert (packed - alone).abs().max().item() <= 2e-6
    assert spy["cu"][:2] == [True, True]  # the packed forward's two layers took the varlen op
    assert spy["masks"] == len(docs)  # only the four separate forwards built a mask


@pytest.mark.parametrize("adapter", [False, True], ids=["prefix+LoRA", "prefix+Adapter"])
@pytest.mark.parametrize("lengths,P", [((5, 1, 9, 7), 4), ((13,), 4), ((1, 6, 1, 3), 1)],
                         ids=["mixed", "one-document", "singletons-P1"])
def test_packed_loss_and_gradients_equal_documents_alone(adapter, lengths, P):
    m = _patched(_llama(2), P=P, adapter=adapter).train()
    docs = _docs(lengths)
    params = [p for p in m.parameters() if p.requires_grad]
    loss = m(**_packed(docs, "position_ids")).loss
    grads = torch.autograd.grad(loss, params)
    ref = _separate_loss(m, docs)
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9


def test_prefix_stage_and_gradient_checkpointing():
    m = _patched(_llama(2))
    pf.set_stage(m, "prefix")
    m.train()
    if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.25's name
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    docs = _docs((4, 8, 3))
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(m(**_packed(docs, "flash_kwargs")).loss, params)
    ref_grads = torch.autograd.grad(_separate_loss(m, docs), params)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_hf_collator_with_flattening_trains_the_patched_model():
    from transformers import DataCollatorWithFlattening

    m = _patched(_llama(2)).train()
    docs = _docs((5, 9, 7))
    for flash in (False, True):
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash)([{"input_ids": d.tolist()} for d in docs])
        loss = m(**batch).loss
        assert abs(loss.item() - _separate_loss(m, docs).item()) <= 1e-5 * loss.item()


def test_padded_batches_are_untouched_after_a_packed_one(spy):
    """The packed state lives for one forward: a padded batch after it gets its mask."""
    m = _patched(_llama(2))
    docs = _docs((5, 9))
    with torch.no_grad():
        m(**{k: v for k, v in _packed(docs, "position_ids").items() if k != "labels"})
        ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), docs[0]]), docs[1]])
        mask = torch.stack([torch.cat([torch.zeros(4), torch.ones(5)]), torch.ones(9)]).long()
        padded = m(ids, attention_mask=mask).logits
        alone = m(docs[0][None]).logits
    assert (padded[0, 4:] - alone[0]).abs().max() <= 2e-5


def test_disabled_model_packs_through_sdpa_with_the_document_mask():
    base = _llama(2)
    m = _patched(base)
    docs = _docs((5, 1, 9))
    kw = {k: v for k, v in _packed(docs, "flash_kwargs").items() if k != "labels"}
    with torch.no_grad(), pf.disabled(m):
        packed = m(**kw).logits
        alone = torch.cat([base(d[None]).logits for d in docs], 1)
    assert (packed - alone).abs().max() <= 2e-6


def test_offsets_from_position_ids():
    row = packing.offsets_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert row.cu_seqlens.tolist() == [0, 3, 4, 6] and row.max_seqlen == 3 and row.tokens == 6
    assert packing.offsets_from_position_ids(torch.arange(6)[None]) is None  # one document
    assert packing.offsets_from_position_ids(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # not one row


def test_models_that_cannot_pack_refuse_with_the_reason():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, decoder_start_token_id=0)).eval()
    m = pf.patch(t5, {"prefix": {"num_tokens": 2, "components": ["encoder", "decoder"]},
                       "fused_loss": False})
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot take a packed batch .*encoder-decoder"):
        m(torch.randint(3, VOCAB, (1, 6)), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long),
          cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)

    class Config:
        model_type = "qwen2_vl"

    class Fake(torch.nn.Module):
        config = Config()

    assert "3-D" in packing.packing_refusal(Fake())


def test_explain_names_the_varlen_implementation():
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    pk, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    assert ops.explain(ops.prefix_attention, q, k, v, pk, pv, causal=True, cu_seqlens=cu).chosen == "block_cpp"


def _text_model_folder(tmp_path) -> str:
    """A tiny Llama (GQA) and the tiny word-level tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptpeft_fast.models.tiny_blip2 import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2,
                      eos_token_id=2, pad_token_id=0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_cli_packed_and_padded_stages_take_the_same_steps(tmp_path, monkeypatch):
    """train.packing: the same data packed (no padding, varlen attention) and padded give the same
    per-step losses in both stages; the report says which ran."""
    from ptpeft_fast.train.config import load_config
    from ptpeft_fast.train.tasks import make_run

    from _train_helpers import events

    folder = _text_model_folder(tmp_path)
    rows = []
    real = packing.offsets_from_position_ids
    monkeypatch.setattr(packing, "offsets_from_position_ids", lambda ids: rows.append(1) or real(ids))
    base = [f"model.name={folder}", "data.format=synthetic-text", "data.train={n: 6}", "data.val={n: 1}",
            "train.progress=false", "train.num_threads=1", "train.log_every=1", "stage1.batch_size=4",
            "stage2.batch_size=4", "stage2.grad_accum=2", "stage1.max_steps=3", "stage2.max_steps=3",
            "stage1.prefix.num_tokens=4", "stage1.prefix.hidden_size=16", "eval.zero_shot=false",
            "eval.after_each_stage=false", "eval.spectrum=false", "eval.max_new_tokens=2"]
    make_run(load_config(None, base), str(tmp_path / "padded")).execute()
    assert not rows
    packed_cfg = load_config(None, base + ["train.packing=true", "train.max_tokens=40"])
    make_run(packed_cfg, str(tmp_path / "packed")).execute()
    assert rows  # the packed rows went through the varlen path
    padded = [e["loss"] for e in events(str(tmp_path / "padded"), "train")]
    packed = [e["loss"] for e in events(str(tmp_path / "packed"), "train")]
    assert len(padded) == len(packed) == 6
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(packed, padded, strict=True)), (packed, padded)
    report = (tmp_path / "packed" / "results.md").read_text()
    assert "packed without padding (train.packing=true, rows of at most 40 tokens" in report
    assert "padded to each micro-batch's longest sequence" in (tmp_path / "padded" / "results.md").read_text()


def test_best_fit_decreasing():
    from ptpeft_fast.train.packed_batches import best_fit_decreasing

    bins = best_fit_decreasing([5, 9, 3, 7, 4, 12], 12)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 9, 3, 7, 4, 12][i] for i in b) <= 12 for b in bins)
    assert len(bins) == 4  # 12 | 9+3 | 7+5 | 4
    assert best_fit_decreasing([20, 3], 10) == [[0], [1]]  # too long: a row of its own
    assert best_fit_decreasing([2, 3], None) == [[0, 1]]


def test_cli_refuses_packing_where_it_cannot_apply(tmp_path):
    from ptpeft_fast.train.config import ConfigError, load_config
    from ptpeft_fast.train.tasks import make_run

    with pytest.raises(ConfigError, match="train.strategy=fsdp"):
        load_config(None, ["train.packing=true", "train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.max_tokens must be a positive integer"):
        load_config(None, ["train.max_tokens=0"])
    c = load_config(None, ["model.pretrained=false", "data.train.n=4", "data.val.n=1", "train.progress=false",
                           "stage1.batch_size=2", "stage2.batch_size=2", "train.packing=true"])
    with pytest.raises(ConfigError, match="cannot take a packed batch"):  # tiny-blip2: query tokens, images
        make_run(c, str(tmp_path / "blip2")).execute()
    assert not (tmp_path / "blip2" / "checkpoints").exists()


def test_the_readmes_peft_packing_gap_is_what_the_tool_prints():
    """README: PEFT's prefix tuning mixes packed documents (judged against PEFT's own forward over
    each document alone), ours does not; the figures quoted there are what the tool prints."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "packing_gap.py")], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    peft_gap, ours_gap = (float(x) for x in re.search(r"PEFT prefix tuning (\S+), ptpeft_fast (\S+)", out).groups())
    assert peft_gap > 0.05 and ours_gap < 1e-6
    readme = (root / "README.md").read_text()
    assert f"max logit gap {peft_gap:.3g} on a tiny Llama" in readme and "(gap below 1e-6: float32 rounding)" in readme


def test_llava_packs_documents_with_their_images():
    """An LMM with image tokens inside the text packs: two documents, each with its image, in one row
    give each document the logits it gets alone (prefix in the language model + LoRA)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    img = VOCAB - 1
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    base = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=img,
                                                     vision_feature_layer=-1)).eval()
    m = _patched(base)
    g = torch.Generator().manual_seed(3)
    docs = [torch.cat([torch.randint(3, 50, (2,), generator=g), torch.full((16,), img),
                       torch.randint(3, 50, (n,), generator=g)]) for n in (3, 6)]
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        packed = m(input_ids=torch.cat(docs)[None], pixel_values=pixels,
                   position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None]).logits
        alone = torch.cat([m(input_ids=d[None], pixel_values=pixels[i:i + 1]).logits for i, d in enumerate(docs)], 1)
    assert (packed - alone).abs().max() <= 2e-5


def test_fullgraph_compile_of_a_packed_row():
    """The FlashAttention-keyword form traces as one graph (no host read of the offsets: they are
    tensors, the longest document a Python int) and gives the eager loss."""
    m = _patched(_llama(2)).train()
    kw = _packed(_docs((5, 9, 7)), "flash_kwargs")
    eager = m(**kw).loss
    torch._dynamo.reset()
    compiled = torch.compile(lambda **k: m(**k).loss, fullgraph=True, backend="eager")(**kw)
    assert abs(compiled.item() - eager.item()) <= 1e-6 * abs(eager.item())
