"""A two-stage run on tiny-blip2: the loss falls in each stage and each stage trains
exactly its parameters."""
import math

import torch

import ptpeft_fast as pf
from ptpeft_fast.train.runner import Run
from ptpeft_fast.train.tasks import make_run

from _train_helpers import cfg, checkpoint_tensors, events


def _run_tracking_changes(c, out, monkeypatch):
    changed = {}
    orig = Run.train_stage

    def tracked(self, stage):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        orig(self, stage)
        changed[stage] = {n for n, p in self.model.named_parameters() if not torch.equal(before[n], p.detach())}
        self._groups = pf.parameter_groups(self.model) if self.patched else {}

    monkeypatch.setattr(Run, "train_stage", tracked)
    run = make_run(c, out)
    rows = run.execute()
    return run, rows, changed


def _falls(losses):
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def test_two_stage_pt_lora(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    c = cfg("stage1.max_steps=6", "stage2.max_steps=6", "stage1.lr=3e-2", "stage2.lr=3e-2",
            "eval.zero_shot=true")
    run, rows, changed = _run_tracking_changes(c, out, monkeypatch)
    groups = run._groups
    by = lambda g: {n for n, k in groups.items() if k == g}  # noqa: E731
    assert by("prefix") and by("lora")
    assert changed["stage1"] == by("prefix")                      # stage 1: prefix only
    assert changed["stage2"] == by("lora") | by("prefix")         # stage 2: LoRA, prefix keeps training
    ev = events(out, "train")
    for stage in ("stage1", "stage2"):
        assert _falls([e["loss"] for e in ev if e["stage"] == stage]), stage
    assert [r["method"] for r in rows] == ["zero-shot", "Prefix", "PT-LoRA"]
    assert all(r["spectrum"]["n_samples"] == 8 for r in rows)
    # checkpoints: stage 1 holds an untouched (zero) LoRA B, stage 2 a trained one
    s1, s2 = checkpoint_tensors(out, "stage1"), checkpoint_tensors(out, "stage2")
    b = [n for n in s1 if "lora" in n.lower() and (n.endswith("B") or "_b" in n.lower() or "lora_B" in n)]
    assert b and all(torch.count_nonzero(s1[n]) == 0 for n in b) and any(torch.count_nonzero(s2[n]) for n in b)
    assert (tmp_path / "run" / "results.md").read_text().count("|") > 10
    assert (tmp_path / "run" / "spectrum.png").stat().st_size > 1000


def test_adapter_with_frozen_prefix_and_full(tmp_path, monkeypatch):
    c = cfg("stage2.method=adapter", "stage2.freeze_prefix=true", "eval.spectrum=false", "stage2.lr=3e-2")
    run, _, changed = _run_tracking_changes(c, str(tmp_path / "a"), monkeypatch)
    adapters = {n for n, k in run._groups.items() if k == "adapter"}
    assert adapters and changed["stage2"] == adapters             # prefix frozen in stage 2
    c = cfg("stage1.enabled=false", "stage2.method=full", "eval.spectrum=false", "stage2.lr=1e-3")
    run, _, changed = _run_tracking_changes(c, str(tmp_path / "f"), monkeypatch)
    names = [n for n, _ in run.model.named_parameters()]
    assert len(changed["stage2"]) >= 0.8 * len(names)             # full FT: base weights train
    for part in ("vision_model.", "qformer.", "language_model."):
        assert any(n.startswith(part) for n in changed["stage2"]), part
    assert _falls([e["loss"] for e in events(str(tmp_path / "f"), "train")])


def test_gradient_checkpointing_same_losses(tmp_path):
    extra = ("stage1.enabled=false", "stage2.max_steps=2", "eval.spectrum=false", "eval.zero_shot=false")
    make_run(cfg(*extra), str(tmp_path / "a")).execute()
    run = make_run(cfg(*extra, "model.gradient_checkpointing=true"), str(tmp_path / "b"))
    run.execute()
    assert getattr(run.model, "is_activation_checkpointing", None) or run.model.is_gradient_checkpointing
    la = [e["loss"] for e in events(str(tmp_path / "a"), "train")]
    lb = [e["loss"] for e in events(str(tmp_path / "b"), "train")]
    assert la == lb or all(abs(x - y) < 1e-6 for x, y in zip(la, lb, strict=True))


def test_bf16_autocast_on_cpu_trains_lora_and_adapter(tmp_path):
    """train.precision=bf16 on CPU runs the steps under torch.autocast: the fused LoRA and adapter
    layers get bf16 activations beside fp32 weights (a dtype-mismatch error before session 5)."""
    for method in ("lora", "adapter"):
        out = str(tmp_path / method)
        make_run(cfg("train.precision=bf16", f"stage2.method={method}", "eval.spectrum=false", "eval.zero_shot=false",
                "stage2.lr=3e-2"), out).execute()
        losses = [e["loss"] for e in events(out, "train") if e["stage"] == "stage2"]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses), (method, losses)


def test_train_compile_gives_the_eager_losses_in_both_stages(tmp_path):
    """train.compile=true runs both stages under torch.compile (backend aot_eager here: the same
    graphs as inductor, without its code generation) with the eager losses."""
    extra = ("stage1.max_steps=2", "stage2.max_steps=2", "eval.spectrum=false", "eval.zero_shot=false")
    make_run(cfg(*extra), str(tmp_path / "a")).execute()
    make_run(cfg(*extra, "train.compile=true", "train.compile_backend=aot_eager"), str(tmp_path / "b")).execute()
    la = [(e["stage"], e["loss"]) for e in events(str(tmp_path / "a"), "train")]
    lb = [(e["stage"], e["loss"]) for e in events(str(tmp_path / "b"), "train")]
    assert [s for s, _ in la] == [s for s, _ in lb] and {s for s, _ in la} == {"stage1", "stage2"}
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for (_, x), (_, y) in zip(lb, la, strict=True)), (la, lb)


def test_the_fused_loss_takes_the_same_steps_as_transformers_loss(tmp_path, monkeypatch):
    """train.fused_loss (the default: the head and the loss fused, no logits) and false (transformers'
    logits and loss) give the same per-step losses; the fused run never builds the logits."""
    import importlib

    lce = importlib.import_module("ptpeft_fast.ops.linear_cross_entropy")
    calls = []
    real = lce.chunked_loss_and_grads
    monkeypatch.setattr(lce, "chunked_loss_and_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    extra = ("stage1.max_steps=3", "stage2.max_steps=3", "eval.zero_shot=false", "eval.after_each_stage=false",
             "eval.spectrum=false")
    make_run(cfg(*extra), str(tmp_path / "fused")).execute()
    assert calls  # the op ran
    make_run(cfg(*extra, "train.fused_loss=false"), str(tmp_path / "plain")).execute()
    fused = [e["loss"] for e in events(str(tmp_path / "fused"), "train")]
    plain = [e["loss"] for e in events(str(tmp_path / "plain"), "train")]
    assert len(fused) == len(plain) == 6
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(fused, plain, strict=True)), (fused, plain)
