"""tools/gpu_check.py, the one command for a lent GPU, runs here: its CPU steps pass and its GPU
steps say why they were skipped (CI also runs this on the oldest stack, the GPU image's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_from_the_checkout_and_reports_every_step(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["step"]: r for r in summary}
    assert list(status) == ["env", "imports", "cuda-tests", "bench"], res.stdout
    assert status["env"]["status"] == "passed" and status["imports"]["status"] == "passed", res.stdout
    env = json.loads((tmp_path / "env.log").read_text().strip().splitlines()[-1])
    assert env["torch"] == torch.__version__
    if not torch.cuda.is_available():
        for step in ("cuda-tests", "bench"):
            assert status[step]["status"] == "skipped" and "no CUDA" in status[step]["detail"]
    assert res.returncode == (1 if any(r["status"] == "failed" for r in summary) else 0)
    assert "| imports | passed |" in (tmp_path / "summary.md").read_text()


def test_gpu_check_refuses_an_unknown_step(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path), "--steps", "env,gpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown step" in res.stderr
