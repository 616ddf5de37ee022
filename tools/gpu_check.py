"""One command for a lent GPU machine: run what needs CUDA, write every result to one folder.

    PYTHONPATH=. python tools/gpu_check.py [--out gpu-check] [--steps env,imports,cuda-tests,bench]

Made for the GPU machine's stock image (torch 2.11 + CUDA 13, Triton 3.6, transformers 5.17, peft;
no package registry): it runs from the uninstalled checkout and installs nothing. Each step runs in
its own subprocess with its own time limit and writes ``<out>/<step>.log``; ``<out>/summary.json``
and ``<out>/summary.md`` say what passed, failed or was skipped, and why. Steps:

- ``env``: device, compute capability, torch / CUDA / Triton / transformers / peft versions.
- ``imports``: ``ptpeft_fast``, its Triton ops and ``ptpeft_fast.kernels`` from this checkout.
- ``cuda-tests``: the suite's CUDA tests (compiled Triton kernels against the float64 torch
  reference, fp16/bf16/fp32, and xformers where installed), ``TRITON_INTERPRET=0``.
- ``bench``: ``benchmarks/test_bench_gpu_kernels.py`` (ours vs the torch/SDPA peers, same run)
  and ``<out>/BENCHMARKS-GPU.md`` from its JSON.

Without a CUDA device the GPU steps are skipped with that reason, so the script itself is tested on
CPU (tests/test_gpu_check.py, also on the oldest stack in CI): a lent GPU's minutes are not spent on
import errors. Exit status: 0 when no step failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "imports", "cuda-tests", "bench")
LIMITS_S = {"env": 120, "imports": 300, "cuda-tests": 300, "bench": 300}

ENV_CODE = r"""
import json, torch
info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
for mod in ("triton", "transformers", "peft", "numpy", "xformers"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # absent or broken: say which
        info[mod] = f"unavailable ({type(exc).__name__})"
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
print(json.dumps(info))
"""

IMPORTS_CODE = r"""
import sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
import ptpeft_fast, ptpeft_fast.ops
import ptpeft_fast.kernels, ptpeft_fast.ops.triton_ops
for mod in (ptpeft_fast, ptpeft_fast.kernels):
    assert Path(mod.__file__).resolve().is_relative_to(root), (mod.__name__, mod.__file__, root)
print("ptpeft_fast and its Triton kernels import from", root)
"""


def _run(cmd: list[str], log: Path, limit_s: int, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` in the checkout; its output goes to ``log``; returns (exit status, last lines)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                **(env or {})}
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=limit_s)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, rc = out + f"\n[timed out after {limit_s} s]", 124
    log.write_text(out)
    return rc, "\n".join(out.strip().splitlines()[-5:])


def run_step(step: str, out: Path, cuda: bool) -> dict:
    """One step: ``{"step", "status": passed|failed|skipped, "seconds", "detail"}``."""
    log = out / f"{step}.log"
    t0 = time.time()
    if step in ("cuda-tests", "bench") and not cuda:
        return {"step": step, "status": "skipped", "seconds": 0.0, "detail": "no CUDA device on this machine"}
    py = sys.executable
    if step == "env":
        cmd = [py, "-c", ENV_CODE]
    elif step == "imports":
        cmd = [py, "-c", IMPORTS_CODE, str(ROOT)]
    elif step == "cuda-tests":
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_dispatch.py", "-k", "cuda"]
    else:
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_gpu_kernels.py",
               "--benchmark-only", f"--benchmark-json={out / 'gpu-bench.json'}"]
    # compiled kernels on the GPU: the suite's conftest defaults the interpreter on, for CPU runs
    rc, tail = _run(cmd, log, LIMITS_S[step], env={"TRITON_INTERPRET": "0"})
    if step == "bench" and rc == 0 and not (out / "gpu-bench.json").is_file():
        rc, tail = 1, tail + "\nthe benchmarks wrote no results (every case skipped?): see bench.log"
    elif step == "bench" and rc == 0:
        rc, tail = _run([py, "benchmarks/report.py", "--json", str(out / "gpu-bench.json"), "--no-memory",
                         "--no-profile", "-o", str(out / "BENCHMARKS-GPU.md")], out / "bench-report.log", 120)
    return {"step": step, "status": "passed" if rc == 0 else "failed", "seconds": round(time.time() - t0, 1),
            "detail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="folder for the results (default: gpu-check/)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    results = []
    for step in steps:
        print(f"[gpu_check] {step} ...", flush=True)
        r = run_step(step, args.out, cuda)
        print(f"[gpu_check] {step}: {r['status']} ({r['seconds']} s) {r['detail'].splitlines()[-1] if r['detail'] else ''}",
              flush=True)
        results.append(r)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# GPU check", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['detail'].splitlines()[-1] if r['detail'] else ''} |"
              for r in results]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
