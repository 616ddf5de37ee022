"""Shared settings for the training tests: a random-init tiny-blip2 on a few
synthetic-shapes samples, one thread, no progress bars."""
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

BASE = ["model.pretrained=false", "data.train.n=48", "data.val.n=4", "stage1.max_steps=4",
        "stage2.max_steps=4", "stage1.batch_size=8", "stage2.batch_size=8", "eval.batch_size=16",
        "eval.max_new_tokens=2", "eval.spectrum_samples=8", "train.progress=false", "train.num_threads=1",
        "train.log_every=1", "stage1.prefix.num_tokens=4", "stage1.prefix.hidden_size=32"]


def cfg(*extra):
    from ptpeft_fast.train.config import load_config
    return load_config(None, BASE + list(extra))


def write_yaml(path, *extra):
    from ptpeft_fast.train.config import dump_config
    path.write_text(dump_config(cfg(*extra)))
    return str(path)


def events(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == kind]


def checkpoint_tensors(out, stage):
    return load_file(os.path.join(out, "checkpoints", stage, "ptpeft.safetensors"))


def run_cli(config, sets, out) -> list:
    """``python -m ptpeft_fast.train --config <config> --set ...`` in a subprocess, as users run it,
    writing to ``out``; returns the run's records (``metrics.jsonl``)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "ptpeft_fast.train", "--config", str(config)]
    for s in [*sets, f"output.dir={out}"]:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_loss_falls_in_each_stage(rows, steps: int) -> None:
    for stage in ("stage1", "stage2"):
        losses = [r["loss"] for r in rows if r.get("event") == "train" and r.get("stage") == stage]
        assert len(losses) == steps and losses[-1] < losses[0], (stage, losses)
