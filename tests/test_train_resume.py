"""Ctrl-C mid-stage writes a resumable checkpoint; resuming reaches the same result as an
uninterrupted run; half-written checkpoints are never loaded."""
import os
import signal
import subprocess
import sys

import torch

from ptpeft_fast.models import MMCollator
from ptpeft_fast.train import main
from ptpeft_fast.train.tasks import make_run

from _train_helpers import cfg, checkpoint_tensors, events, write_yaml

EXTRA = ("stage1.max_steps=4", "stage2.max_steps=5", "eval.zero_shot=false", "eval.after_each_stage=false",
         "stage1.lr=3e-2", "stage2.lr=3e-2", "eval.spectrum_samples=4")


def test_ctrl_c_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    ref_out = str(tmp_path / "ref")
    ref_rows = make_run(cfg(*EXTRA), ref_out).execute()

    out = str(tmp_path / "run")
    conf = write_yaml(tmp_path / "c.yaml", *EXTRA)
    calls = {"n": 0}
    orig = MMCollator.__call__

    def call(self, items):
        if self.train:
            calls["n"] += 1
            if calls["n"] == 6:  # stage 2, second step: a real SIGINT, as from Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
        return orig(self, items)

    monkeypatch.setattr(MMCollator, "__call__", call)
    assert main(["--config", conf, "--set", f"output.dir={out}"]) == 130
    assert os.path.isfile(os.path.join(out, "state", "COMPLETE"))
    assert os.path.isdir(os.path.join(out, "checkpoints", "stage1"))
    assert not os.path.exists(os.path.join(out, "checkpoints", "stage2"))
    monkeypatch.setattr(MMCollator, "__call__", orig)
    # a half-written newer state of a killed writer must be ignored, and is cleaned up
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(out, f"state.tmp-{dead.pid}")
    os.makedirs(stale)
    with open(os.path.join(stale, "trainer.pt"), "wb") as f:
        f.write(b"garbage")
    stale_file = os.path.join(out, "checkpoints", f"stage1.tmp-{dead.pid}")
    open(stale_file, "w").write("half")
    assert main(["--resume", out]) == 0
    assert not os.path.exists(stale) and not os.path.exists(stale_file)

    s2_steps = [e["step"] for e in events(out, "train") if e["stage"] == "stage2"]
    assert s2_steps[-1] == 5 and 3 in s2_steps and 2 in s2_steps  # continued from step 2
    rows = [r for r in events(out, "eval")]
    assert rows[-1]["metrics"] == ref_rows[-1]["metrics"]
    assert rows[-1]["spectrum"]["curve"] == ref_rows[-1]["spectrum"]["curve"]
    a, b = checkpoint_tensors(ref_out, "stage2"), checkpoint_tensors(out, "stage2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_needs_resume(tmp_path, capsys):
    out = str(tmp_path / "o")
    os.makedirs(out)
    open(os.path.join(out, "progress.json"), "w").write('{"done": []}')
    assert main(["--set", "model.pretrained=false", "--config", write_yaml(tmp_path / "c.yaml"),
                 "--set", f"output.dir={out}"]) == 2
    assert "--resume" in capsys.readouterr().err
