"""PT-PEFT on a bitsandbytes-quantized base (QLoRA) on CPU: LoRA over ``Linear4bit`` (NF4, FP4,
double quantisation) and ``Linear8bitLt``, against PEFT's QLoRA given the same LoRA weights and
against our own model on the de-quantised weights; merge refused, ``save_merged`` de-quantised,
save/load, ``disabled``, gradient checkpointing and PEFT export on the quantized base."""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (pip install -e '.[quant]') is not installed")

import ptpeft_fast as pf  # noqa: E402
from ptpeft_fast.quantized import dequantized_weight, keep_differentiable, quantized_base  # noqa: E402

from _tiny_models import batch, model_dir  # noqa: E402
from _train_helpers import assert_loss_falls_in_each_stage, run_cli  # noqa: E402

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def quantized(kind: str, path: str | None = None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    extra = {"bnb_4bit_compute_dtype": torch.float32} if kind != "int8" else {}
    cfg = BitsAndBytesConfig(**QUANT[kind], **extra)
    return AutoModelForCausalLM.from_pretrained(path or model_dir("llama"), quantization_config=cfg,
                                                device_map="cpu").eval()


def lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "_ptpeft_lora")}


def randomise_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def ours_and_peft(kind: str, path: str | None = None, r: int = 4, fused_loss: bool = True):
    """Our LoRA and PEFT's QLoRA on two copies of the same quantized base, with the same LoRA weights."""
    from peft import LoraConfig, get_peft_model
    ours = quantized(kind, path)
    pf.patch(ours, pf.PTPeftConfig(prefix=None, lora={"r": r, "alpha": 2 * r, "targets": TARGETS},
                                   fused_loss=fused_loss))
    randomise_lora(ours)
    peft = get_peft_model(quantized(kind, path), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                            lora_dropout=0.0))
    # the peer on the same bitsandbytes path as ours: without this, on an AVX512-BF16 CPU its first
    # no-grad eval forward repacks the 4-bit weights for a bfloat16 gemv without autograd
    keep_differentiable(peft)
    with torch.no_grad():
        for path_, layer in lora_layers(ours).items():
            w = getattr(layer, layer._ptpeft_lora)
            pl = peft.get_submodule(f"base_model.model.{path_}")
            pl.lora_A["default"].weight.copy_(w.lora_A)
            pl.lora_B["default"].weight.copy_(w.lora_B)
    return ours, peft


def forward_backward(model, ids, mask):
    model.train()
    for _n, p in model.named_parameters():
        if p.grad is not None:
            p.grad = None
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out


@pytest.mark.parametrize("kind", list(QUANT))
def test_lora_over_bnb_layers_equals_peft_qlora(kind):
    ours, peft = ours_and_peft(kind)
    assert all(quantized_base(m) is not None for m in lora_layers(ours).values())
    pf.set_stage(ours, "peft")
    ids, mask = batch(length=10)
    with torch.no_grad():
        lo = ours.eval()(input_ids=ids, attention_mask=mask).logits
        lp = peft.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(lo[real], lp[real]) <= 1e-5
    a, b = forward_backward(ours, ids, mask), forward_backward(peft, ids, mask)
    assert abs(float(a.loss) - float(b.loss)) <= 1e-5 * abs(float(b.loss))
    n = 0
    for path, layer in lora_layers(ours).items():
        w = getattr(layer, layer._ptpeft_lora)
        pl = peft.get_submodule(f"base_model.model.{path}")
        for mine, theirs in ((w.lora_A, pl.lora_A["default"].weight), (w.lora_B, pl.lora_B["default"].weight)):
            assert mine.grad is not None and rel(mine.grad, theirs.grad) <= 1e-5, (path, rel(mine.grad, theirs.grad))
            n += 1
    assert n == 2 * len(TARGETS) * 2  # A and B of every target in both layers


def _dense_copy(qmodel):
    """The tiny Llama in float32 with every quantized layer's de-quantised weight."""
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if quantized_base(m) is not None:
                dense.get_submodule(name).weight.copy_(dequantized_weight(m))
    return dense


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("second", ["lora", "adapter"])
def test_prefix_lora_and_adapters_on_a_quantized_base_equal_the_dequantised_model(kind, second):
    """Prefix + LoRA (or adapters), both stages, on the quantized base = the same modules on a
    float32 model holding the de-quantised weights (what bitsandbytes multiplies by)."""
    q = quantized(kind)
    dense = _dense_copy(q)
    cfg = pf.PTPeftConfig(prefix={"num_tokens": 3, "hidden_size": 8},
                          lora={"r": 4, "targets": TARGETS} if second == "lora" else None,
                          adapter={"bottleneck": 4} if second == "adapter" else None)
    pf.patch(q, cfg)
    pf.patch(dense, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        dp = dict(dense.named_parameters())
        for n, p in q.named_parameters():
            if p.requires_grad or "lora_" in n or "prefix" in n or "adapter" in n:
                if p.is_floating_point() and n in dp and not quantized_base(q.get_submodule(n.rsplit(".", 1)[0])):
                    v = torch.randn(p.shape, generator=g) * 0.05
                    p.copy_(v)
                    dp[n].copy_(v)
    ids, mask = batch(length=8)
    for stage in ("prefix", "peft"):
        pf.set_stage(q, stage)
        pf.set_stage(dense, stage)
        a, b = forward_backward(q, ids, mask), forward_backward(dense, ids, mask)
        assert rel(a.loss, b.loss) <= 1e-5
        grads = [(n, p.grad, dp[n].grad) for n, p in q.named_parameters() if p.requires_grad]
        assert grads and all(g1 is not None for _, g1, _ in grads)
        for n, g1, g2 in grads:
            assert rel(g1, g2) <= 1e-4, (stage, n, rel(g1, g2))


def lora_on_nf4():
    """A tiny Llama in NF4 with LoRA (random factors) on ``TARGETS``, and a batch with its logits."""
    q = quantized("nf4")
    pf.patch(q, pf.PTPeftConfig(prefix=None, lora={"r": 4, "targets": TARGETS}))
    randomise_lora(q)
    ids, mask = batch(length=8)
    with torch.no_grad():
        logits = q(input_ids=ids, attention_mask=mask).logits
    return q, ids, mask, logits


def test_merge_is_refused_and_save_merged_writes_a_dequantised_model(tmp_path):
    from transformers import AutoModelForCausalLM
    q, ids, mask, before = lora_on_nf4()
    with pytest.raises(ValueError, match="re-quantise.*save_merged"):
        pf.merge(q)
    assert not any(getattr(m, m._ptpeft_lora).merged for m in lora_layers(q).values())  # nothing changed
    pf.save_merged(q, tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(quantized_base(m) for m in plain.modules())
    with torch.no_grad():
        after = plain(input_ids=ids, attention_mask=mask).logits
    # the de-quantised merged model computes what the unmerged 4-bit model does, up to float32 rounding
    assert rel(after[mask.bool()], before[mask.bool()]) <= 1e-5


def test_save_load_disabled_checkpointing_and_peft_export_on_a_4bit_base(tmp_path):
    from peft import PeftModel
    q, ids, mask, ref = lora_on_nf4()
    with torch.no_grad():
        unpatched = quantized("nf4")
        keep_differentiable(unpatched)  # the path a patched model keeps (no bfloat16 CPU repacking)
        base = unpatched(input_ids=ids, attention_mask=mask).logits
        with pf.disabled(q):
            off = q(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, base)
    # save -> load into a fresh 4-bit base: the same logits
    pf.save(q, tmp_path / "ckpt")
    fresh = pf.load(quantized("nf4"), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, ref)
    # ... and into a full-precision copy of the same base: the same LoRA tensors
    from transformers import AutoModelForCausalLM
    full = pf.load(AutoModelForCausalLM.from_pretrained(model_dir("llama")), tmp_path / "ckpt")
    fq = {n: p for n, p in q.named_parameters() if "lora_" in n}
    for n, p in full.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, fq[n])
    # gradient checkpointing: the same loss and LoRA gradients
    pf.set_stage(q, "peft")
    plain = forward_backward(q, ids, mask)
    g_plain = {n: p.grad.clone() for n, p in q.named_parameters() if p.requires_grad}
    q.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = forward_backward(q, ids, mask)
    assert rel(ckpt.loss, plain.loss) <= 1e-6
    for n, p in q.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, g_plain[n]) <= 1e-5, n
    q.gradient_checkpointing_disable()
    # PEFT export, loaded by PEFT onto its own 4-bit base
    pf.to_peft(q, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(quantized("nf4"), tmp_path / "peft").eval()
    keep_differentiable(theirs)
    with torch.no_grad():
        lp = theirs(input_ids=ids, attention_mask=mask).logits
    assert rel(lp[mask.bool()], ref[mask.bool()]) <= 1e-5


def test_an_evaluation_pass_does_not_cost_the_next_step_its_gradients():
    """On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight on the first no-grad eval forward and
    then multiplies through a gemv without autograd (PEFT's QLoRA then gets no gradient for most of
    its LoRA tensors). A patched model keeps the differentiable path: after an evaluation pass the
    training step's gradients are those of a model that never evaluated."""
    def make():
        q = quantized("nf4")
        torch.manual_seed(0)  # the same prefix initialisation
        pf.patch(q, pf.PTPeftConfig(prefix={"num_tokens": 2, "hidden_size": 8}, lora={"r": 4, "targets": TARGETS}))
        randomise_lora(q)
        pf.set_stage(q, "peft")
        return q
    ids, mask = batch(length=10)
    a, b = make(), make()
    with torch.no_grad():
        b.eval()(input_ids=ids, attention_mask=mask)
    forward_backward(a, ids, mask)
    forward_backward(b, ids, mask)
    gb = dict(b.named_parameters())
    grads = [(n, p.grad, gb[n].grad) for n, p in a.named_parameters() if p.requires_grad]
    assert len(grads) > 12
    for n, g1, g2 in grads:
        assert g2 is not None and torch.equal(g1, g2), n


# ------------------------------------------------------------- SmolLM2-135M's real weights in NF4
@pytest.fixture(scope="module")
def smollm2_folder():
    from ptpeft_fast.models import smollm2
    try:
        return str(smollm2.smollm2_path(log=lambda _: None))
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_nf4_lora_equals_peft_qlora(smollm2_folder):
    """Real weights loaded in NF4: logits and every LoRA gradient equal PEFT's QLoRA given the same
    LoRA weights (the loss through transformers' own cross-entropy on both sides, so only the
    QLoRA part is compared; the fused loss is tested against it elsewhere)."""
    from transformers import AutoTokenizer
    ours, peft = ours_and_peft("nf4", smollm2_folder, r=8, fused_loss=False)
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    tok.padding_side = "right"
    enc = tok(["def urljoin(base, url, allow_fragments=True):", "def gcd(a, b):"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pf.set_stage(ours, "peft")
    with torch.no_grad():
        lo = ours.eval()(input_ids=ids, attention_mask=mask).logits
        lp = peft.eval()(input_ids=ids, attention_mask=mask).logits
    assert rel(lo[mask.bool()], lp[mask.bool()]) <= 1e-5
    a, b = forward_backward(ours, ids, mask), forward_backward(peft, ids, mask)
    assert rel(a.loss, b.loss) <= 1e-5
    mine, theirs = [], []
    for path, layer in lora_layers(ours).items():
        w = getattr(layer, layer._ptpeft_lora)
        pl = peft.get_submodule(f"base_model.model.{path}")
        mine += [w.lora_A.grad.flatten(), w.lora_B.grad.flatten()]
        theirs += [pl.lora_A["default"].weight.grad.flatten(), pl.lora_B["default"].weight.grad.flatten()]
    assert len(mine) == 30 * len(TARGETS) * 2
    assert rel(torch.cat(mine), torch.cat(theirs)) <= 1e-5
    worst = max(rel(m, t) for m, t in zip(mine, theirs, strict=True))
    assert worst <= 1e-4, worst  # per tensor: fp32 summation order over 30 layers


def test_two_stage_cli_run_on_an_nf4_base_loss_falls_in_each_stage(smollm2_folder, tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    sets = ["model.quantize=nf4", "experiment.methods=[]", "data.max_train_samples=4", "eval.max_samples=2",
            "eval.max_new_tokens=4", "eval.zero_shot=false", "eval.after_each_stage=false", "eval.spectrum=false",
            "eval.batch_size=2", "eval.val_every=0", "stage1.max_steps=3", "stage1.batch_size=4", "stage1.lr=5e-3",
            "stage1.warmup_ratio=0", "stage2.max_steps=3", "stage2.batch_size=4", "stage2.lr=1e-3",
            "stage2.warmup_ratio=0", "train.log_every=1", "train.progress=false", "train.num_threads=2"]
    rows = run_cli(root / "ptpeft_fast" / "configs" / "smollm2-code-captions.yaml", sets, out)
    assert_loss_falls_in_each_stage(rows, 3)
    assert any(r.get("event") == "eval" for r in rows)
    # the stage-2 checkpoint holds adapter tensors only and loads into a fresh 4-bit base
    fresh = pf.load(quantized("nf4", smollm2_folder), out / "checkpoints" / "stage2")
    assert sum(quantized_base(m) is not None for m in fresh.modules()) > 100


def test_quantize_config_errors_name_the_fix(monkeypatch):
    from ptpeft_fast.train.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="stage2.method=full"):
        load_config(None, ["model.quantize=nf4", "model.pretrained_path=/x", "stage2.method=full"])
    with pytest.raises(ConfigError, match="model.quantize='q3'|not allowed"):
        load_config(None, ["model.quantize=q3"])
    import builtins
    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    from ptpeft_fast.quantized import bnb_config
    with pytest.raises(ImportError, match=r"\.\[quant\]"):
        bnb_config("nf4", torch.float32)


def test_a_peft_qlora_checkpoint_imports_onto_a_4bit_base(tmp_path):
    """PEFT's QLoRA adapter folder (LoRA trained on an NF4 base) loads into ours on a fresh NF4 base
    and computes PEFT's logits."""
    ours, peft = ours_and_peft("nf4")
    peft.save_pretrained(tmp_path / "peft")
    mine = pf.from_peft(quantized("nf4"), tmp_path / "peft")
    ids, mask = batch(length=8)
    with torch.no_grad():
        lp = peft.eval()(input_ids=ids, attention_mask=mask).logits
        lo = mine.eval()(input_ids=ids, attention_mask=mask).logits
    assert rel(lo[mask.bool()], lp[mask.bool()]) <= 1e-5
    assert all(quantized_base(m) is not None for m in lora_layers(mine).values()) and len(lora_layers(mine)) == 6
