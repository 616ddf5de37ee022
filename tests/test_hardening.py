"""Hardening: bad checkpoints, determinism, patching twice / PEFT-wrapped / torch.compile."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME

from _tiny_models import VOCAB, batch, load, logits


def _config() -> pf.PTPeftConfig:
    return pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=2, hidden_size=8), lora=pf.LoraConfig(r=2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = pf.patch(load(), _config())
    path = tmp_path_factory.mktemp("ckpt")
    pf.save(model, path)
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_meta(path, **changes):
    meta = json.loads((path / CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        elif k == "config":
            meta["config"].update(v)
        else:
            meta[k] = v
    (path / CONFIG_NAME).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_into_wrong_architecture(ckpt):
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        pf.load(load("gpt2"), ckpt)


def test_checkpoint_into_same_family_other_size_is_refused_and_model_left_unpatched(ckpt):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()
    ids, mask = batch()
    before = logits(small, ids, mask)
    with pytest.raises(ValueError, match="checkpoint shape .* != model shape .*another size"):
        pf.load(small, ckpt)
    # the failed load rolled its patch back: the model is as it was and can be patched again
    assert not hasattr(small, "_ptpeft")
    assert not any("prefix" in n or "lora" in n for n, _ in small.named_parameters())
    assert torch.equal(logits(small, ids, mask), before)
    pf.patch(small, _config())


def test_truncated_weights_file(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    blob = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        pf.load(load(), path)
    _edit_meta(path, weights_sha256=None)  # no checksum to compare: safetensors' own check must catch it
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pf.load(load(), path)


def test_truncated_or_missing_config(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    text = (path / CONFIG_NAME).read_text()
    (path / CONFIG_NAME).write_text(text[: len(text) // 3])
    with pytest.raises(ValueError, match="not valid JSON"):
        pf.load(load(), path)
    (path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        pf.load(load(), path)


@pytest.mark.parametrize("change", [{"format": 99}, {"config": {"version": 99}},
                                    {"config": {"version": 99, "future_section": {"x": 1}}}])
def test_checkpoint_from_newer_version(ckpt, tmp_path, change):
    path = _copy(ckpt, tmp_path)
    _edit_meta(path, **change)
    with pytest.raises(ValueError, match="newer than this ptpeft_fast.*upgrade"):
        pf.load(load(), path)


def test_config_file_from_newer_version(tmp_path):
    cfg = _config().to_dict()
    cfg["version"] = 99
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer.*upgrade"):
        pf.PTPeftConfig.from_json(tmp_path / "c.json")


# ----------------------------------------------------------------------------- determinism
def _train(seed: int, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=3, hidden_size=8, dropout=0.1),
                          lora=pf.LoraConfig(r=2, dropout=0.1))
    model = pf.patch(load(), cfg)
    pf.set_stage(model, "peft")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch(0, b=2, length=8)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_seed_and_config_give_bit_identical_parameters():
    a, b = _train(0), _train(0)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    c = _train(1)  # the test can tell runs apart
    assert not all(torch.equal(a[n], c[n]) for n in a)


# ----------------------------------------------------------------------------- patching twice, PEFT, compile
def test_patching_twice_is_refused():
    model = pf.patch(load(), _config())
    with pytest.raises(ValueError, match="already patched"):
        pf.patch(model, _config())


def test_patching_a_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(load(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="wrapped by PEFT"):
        pf.patch(wrapped, _config())
    with pytest.raises(ValueError, match="wrapped by PEFT"):
        pf.patch(wrapped.get_base_model(), _config())  # PEFT's layers are inside the base model too


def test_torch_compile_on_patched_model_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # one layer: dynamo unrolls the layers, so this keeps the trace short; GQA and RoPE as in the tiny Llama
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    model = pf.patch(base, _config())
    pf.set_stage(model, "peft")
    ids, mask = batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOTAutograd, as inductor uses them
    loss = compiled(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6), n
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- training faults
_TRAIN = ["model.pretrained=false", "data.train.n=16", "data.val.n=4", "stage1.max_steps=4", "stage2.enabled=false",
          "stage1.batch_size=4", "eval.batch_size=4", "eval.zero_shot=false", "eval.max_new_tokens=1",
          "eval.spectrum=false", "train.progress=false", "train.num_threads=1", "train.log_every=1",
          "stage1.prefix.num_tokens=2", "stage1.prefix.hidden_size=8"]

# Runs the training CLI; the second mid-stage checkpoint write stops halfway through its
# trainer.pt (half the bytes on disk, fsync'ed), says so, and waits to be SIGKILLed.
_KILL_DRIVER = r"""
import os, sys, time
import safetensors.torch as st
real_save = st.save_file
calls = [0]
def save_file(tensors, f, *a, **kw):
    if os.path.basename(str(f)) == "trainer.safetensors":
        calls[0] += 1
        if calls[0] == 2:
            data = st.save(tensors)
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            print("MID-WRITE", flush=True)
            time.sleep(600)
    return real_save(tensors, f, *a, **kw)
st.save_file = save_file
from ptpeft_fast.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train_cli():
    train = pytest.importorskip("ptpeft_fast.train")
    if "--resume" not in train.build_parser().format_help():
        pytest.skip("ptpeft_fast.train has no --resume")
    return train


def test_kill_9_during_checkpoint_write_then_resume(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    train = _train_cli()
    from ptpeft_fast.train.config import dump_config, load_config

    out = tmp_path / "run"
    conf = tmp_path / "c.yaml"
    conf.write_text(dump_config(load_config(None, _TRAIN + ["output.save_every_steps=1", f"output.dir={out}"])))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, "--config", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "MID-WRITE" in line:
                os.kill(proc.pid, signal.SIGKILL)  # a real kill -9, mid-write
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    half = [p for p in out.iterdir() if p.name.startswith("state.tmp-")]
    assert half and not (half[0] / "COMPLETE").exists()  # the half-written checkpoint is there ...
    assert (out / "state" / "COMPLETE").exists()  # ... and so is the previous, complete one

    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 0
    log = capsys.readouterr().out
    assert "resumed: stage1 from step 1" in log  # the previous checkpoint, not the half-written one
    steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if e.get("event") == "train"]
    assert steps[-3:] == [2, 3, 4]
    model = pf.load(load_model_for_run(out), out / "checkpoints" / "stage1")  # the final checkpoint is whole
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "prefix" in n)


def load_model_for_run(out):
    """The run's tiny-blip2 base model, rebuilt from its saved config."""
    from ptpeft_fast.train.config import load_config
    from ptpeft_fast.train.tasks import make_run

    run = make_run(load_config(str(out / "config.yaml")), str(out))
    run.load_model()
    return run.model


def test_non_finite_loss_stops_stage_with_hint_and_nonzero_exit(tmp_path, capsys):
    train = _train_cli()
    from safetensors.torch import load_file

    from ptpeft_fast.train.config import dump_config, load_config

    out = tmp_path / "run"
    conf = tmp_path / "c.yaml"
    # lr=1e30: after one AdamW step the prefix is ~1e30 and the next losses overflow to inf/NaN
    conf.write_text(dump_config(load_config(None, _TRAIN + ["stage1.lr=1e30", "output.save_every_steps=1",
                                                            f"output.dir={out}"])))
    rc = train.main(["--config", str(conf)])
    err = capsys.readouterr().err.lower()
    assert rc != 0
    assert "step" in err and "learning rate" in err and "fp32" in err
    for folder in (out / "state", out / "checkpoints" / "stage1"):  # whatever was kept is the last good one
        for f in folder.glob("*.safetensors") if folder.exists() else ():
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values()), f
