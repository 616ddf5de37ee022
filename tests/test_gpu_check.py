"""tools/gpu_check.py, the one command for a lent GPU, runs here: its CPU steps pass, its GPU steps say why
they were skipped, and with ``--cpu-smoke`` each GPU step's machinery (parallel test shards and their
JUnit counts, the benchmark's warm-up and timed processes, the report) runs at test size in the Triton
interpreter (CI also runs this on the oldest stack, the GPU image's)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_from_the_checkout_and_reports_every_step(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["step"]: r for r in summary}
    assert list(status) == list(_module().STEPS), res.stdout
    assert status["env"]["status"] == "passed" and status["imports"]["status"] == "passed", res.stdout
    env = json.loads((tmp_path / "env.log").read_text().strip().splitlines()[-1])
    assert env["torch"] == torch.__version__
    if not torch.cuda.is_available():
        for step in _module().GPU_STEPS:
            assert status[step]["status"] == "skipped" and "no CUDA" in status[step]["detail"]
    assert res.returncode == (1 if any(r["status"] == "failed" for r in summary) else 0)
    assert "| imports | passed |" in (tmp_path / "summary.md").read_text()


def test_cpu_smoke_runs_each_gpu_step_machinery(tmp_path):
    """kernel-tests in two shards, opcheck, bench (warm-up, timed run, report) at test size on CPU. The
    train step is left out here: it runs tests/test_gpu_training.py's tiny case, tested there."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--cpu-smoke",
                          "--steps", "env,kernel-tests,opcheck,bench"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    status = {r["step"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert all(r["status"] == "passed" for r in status.values()), res.stdout + res.stderr
    assert res.returncode == 0
    # one CPU grid case ran in one of the two shards, the GPU-only ones skipped
    assert status["kernel-tests"]["detail"].startswith("1 passed, 0 failed, 0 errors"), status["kernel-tests"]
    assert (tmp_path / "kernel-tests-0.xml").is_file() and (tmp_path / "kernel-tests-1.xml").is_file()
    bench = json.loads((tmp_path / "gpu-bench.json").read_text())
    (adapter,) = bench["results"]
    assert adapter["ours"]["ms"] > 0 and adapter["ours"]["err"] < 1e-2
    assert adapter["peers"]["unfused"]["target"] == 0.7 and adapter["peers"]["unfused"]["ratio"] > 0
    report = (tmp_path / "BENCHMARKS-GPU.md").read_text()
    assert "## Device and versions" in report and f"torch: {torch.__version__}" in report
    assert "| adapter | tiny | unfused |" in report


def test_gpu_check_refuses_an_unknown_step(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--steps", "env,gpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown step" in res.stderr


def test_step_limits_fit_in_eight_minutes_and_shards_leave_two_cores():
    mod = _module()
    assert set(mod.LIMITS_S) == set(mod.STEPS) and sum(mod.LIMITS_S.values()) <= 480
    assert mod.shards_for(16) == 14 and mod.shards_for(2) == 1 and mod.shards_for(None) == 1


def testjunit_counts_sum_shards_and_ignore_missing_files(tmp_path):
    xml = ('<testsuites><testsuite name="pytest" tests="{t}" failures="{f}" errors="0" skipped="{s}">'
           '</testsuite></testsuites>')
    (tmp_path / "a.xml").write_text(xml.format(t=10, f=1, s=3))
    (tmp_path / "b.xml").write_text(xml.format(t=4, f=0, s=4))
    c = _module().junit_counts([tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "missing.xml"])
    assert c == {"passed": 6, "failed": 1, "errors": 0, "skipped": 7, "files": 2}


def test_configs_summary_counts_distinct_configs_per_kernel(tmp_path):
    log = tmp_path / "configs-used.jsonl"
    rows = [("_attn_fwd", "BLOCK_M: 64"), ("_attn_fwd", "BLOCK_M: 128"), ("_attn_fwd", "BLOCK_M: 64"),
            ("_lora_fwd", "BLOCK_M: 32")]
    log.write_text("".join(json.dumps({"kernel": k, "config": c}) + "\n" for k, c in rows))
    mod = _module()
    assert mod.configs_summary(log) == "autotune configs launched: _attn_fwd 2, _lora_fwd 1"
    assert mod.configs_summary(tmp_path / "none.jsonl") == "autotune configs launched: none logged"


def test_verbose_counts_read_a_killed_shards_log(tmp_path):
    log = tmp_path / "kernel-tests-3.log"
    log.write_text("tests/test_a.py::test_x[c0] PASSED                                [  1%]\n"
                   "tests/test_a.py::test_x[c1] FAILED                                [  2%]\n"
                   "tests/test_a.py::test_y SKIPPED (compiled Triton on CUDA only)    [  3%]\n"
                   "tests/test_a.py::test_z PASSED\n[timed out: killed at the step's deadline]\n")
    assert _module().verbose_counts(log) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
