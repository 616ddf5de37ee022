"""One command for a lent GPU machine: run what needs CUDA, write every result to one folder.

    PYTHONPATH=. python tools/gpu_check.py [--out gpu-check] [--steps env,imports,ext,kernel-tests,...]

Made for the GPU machine's stock image (torch 2.11 + CUDA 13, Triton 3.6, transformers 5.17, peft;
no package registry): it runs from the uninstalled checkout and installs nothing. Each step runs in
its own process group with its own time limit (:data:`LIMITS_S`, 480 s in all: the whole run fits
in 8 minutes) and writes ``<out>/<step>.log``; ``<out>/summary.json`` and ``<out>/summary.md`` say
what passed, failed or was skipped, and why. Steps:

- ``env``: device, compute capability, torch / CUDA / cuDNN / Triton / transformers / peft versions.
- ``imports``: ``ptpeft_fast``, its Triton ops and ``ptpeft_fast.kernels`` from this checkout.
- ``ext``: builds the C++ extension with its CUDA kernels (cached for the later steps; the other
  steps run without it, ``PTPEFT_FAST_NO_EXT=1``, except ``opcheck`` when this step passed).
- ``kernel-tests``: the Triton kernel tests compiled for the GPU (``TRITON_INTERPRET=0``) against
  the float64 reference: fp16/bf16/fp32, GQA, padding, dropout, P = 1…128, head dims 64–256, the
  patched tiny models, the dispatcher's CUDA tests; in parallel shards (one Triton compiler per core),
  one autotune config per test (tests/conftest.py); ``kernel-tests-*.xml`` (JUnit) and
  ``configs-used.jsonl`` (which autotune configs the tests launched).
- ``opcheck``: ``torch.library.opcheck`` of every op and implementation on CUDA (tests/test_compile.py).
- ``train``: a patched Llama from config (8 layers, hidden 2048, 16 / 4 heads, L = 2048, bf16) trained
  in stage ``prefix`` then ``peft`` with Triton against the torch reference path
  (tests/test_gpu_training.py): ``train-llama-2048.json``.
- ``bench``: ``benchmarks/gpu_bench.py`` (compiled and autotuned first in parallel processes, then
  timed in one): ``gpu-bench.json`` and ``BENCHMARKS-GPU.md`` (device, versions, ratios and the
  issue's targets, the training check's losses).

Without a CUDA device the GPU steps are skipped with that reason; ``--cpu-smoke`` instead runs each
step's machinery on CPU at test size (the Triton interpreter, tiny shapes), which is how
tests/test_gpu_check.py checks this script on both stacks: a lent GPU's minutes are not spent on
import errors. Exit status: 0 when no step failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "imports", "ext", "kernel-tests", "opcheck", "train", "bench")
GPU_STEPS = ("ext", "kernel-tests", "opcheck", "train", "bench")
# Seconds per step; they add up to 480 (8 minutes). Estimated on an H200 host (16 cores), before any
# GPU run: about 5, 10, 45, 90, 35, 40 and 110 (Triton compiles at ~1.5 s per kernel variant dominate).
LIMITS_S = {"env": 15, "imports": 25, "ext": 60, "kernel-tests": 120, "opcheck": 50, "train": 60, "bench": 150}

KERNEL_TESTS = ["tests/test_triton_prefix_attention.py", "tests/test_triton_lora.py", "tests/test_triton_adapter.py",
                "tests/test_triton_cross_entropy.py", "tests/test_triton_patched_models.py",
                "tests/test_ops_varlen_attention.py::test_triton_equals_documents_alone",
                "tests/test_ops_varlen_attention.py::test_triton_half_precision",
                "tests/test_dispatch.py::test_cuda_auto_is_triton_and_matches_torch",
                "tests/test_dispatch.py::test_cuda_xformers_matches_torch"]
TRAIN_TEST = "tests/test_gpu_training.py::test_two_stage_training_triton_against_torch"

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
    info["cudnn"] = torch.backends.cudnn.version()
print(json.dumps(info))
"""

IMPORTS_CODE = r"""
import sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
import transformers.activations  # imports Hugging Face's `kernels` where installed: never ours
import ptpeft_fast, ptpeft_fast.ops
import ptpeft_fast.kernels.prefix_attention, ptpeft_fast.ops.triton_ops
for mod in (ptpeft_fast, ptpeft_fast.kernels.prefix_attention):
    assert Path(mod.__file__).resolve().is_relative_to(root), (mod.__name__, mod.__file__, root)
print("ptpeft_fast and its Triton kernels import from", root)
"""

EXT_CODE = r"""
import sys
from ptpeft_fast import _ext
ok = _ext.load_ext()
cuda = ok and _ext.has_kernel("singular_values", "CUDA")
print(f"extension loaded: {ok}; CUDA kernels: {cuda}; variant: {_ext.loaded_variant()}; error: {_ext.ext_error()}")
sys.exit(0 if ok else 1)
"""


def _env(extra: Optional[dict] = None) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra or {})}


def _start(cmd: list[str], log: Path, env: dict) -> tuple[subprocess.Popen, object]:
    f = open(log, "w", encoding="utf-8")  # closed by _finish
    # own process group: a timeout kills the compilers and builders it started too
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f


def _finish(procs: list[tuple[subprocess.Popen, object]], deadline: float) -> list[int]:
    """Wait for every process until ``deadline``; kill the groups still running then (status 124)."""
    codes = []
    for proc, f in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            f.write("\n[timed out: killed at the step's deadline]\n")
            codes.append(124)
        f.close()
    return codes


def _run(cmd: list[str], log: Path, deadline: float, env: dict) -> int:
    return _finish([_start(cmd, log, env)], deadline)[0]


def _tail(path: Path, n: int = 3) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def junit_counts(paths: list[Path]) -> dict:
    """passed / failed / errors / skipped summed over JUnit files (missing files: not counted)."""
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "files": 0}
    for p in paths:
        if not p.is_file():
            continue
        c["files"] += 1
        for suite in ET.parse(p).getroot().iter("testsuite"):
            tests, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            c["passed"] += tests - fail - err - skip
            c["failed"] += fail
            c["errors"] += err
            c["skipped"] += skip
    return c


def verbose_counts(log: Path) -> dict:
    """passed / failed / errors / skipped from the per-test lines of a ``pytest -v`` log."""
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped"}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return c
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in words:
            c[words[parts[1]]] += 1
    return c


def configs_summary(path: Path) -> str:
    """How many distinct autotune configs the compiled tests launched, per kernel (tests/conftest.py logs them)."""
    per: dict[str, set] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per.setdefault(rec["kernel"], set()).add(rec["config"])
    if not per:
        return "autotune configs launched: none logged"
    return "autotune configs launched: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(per.items()))


def _pytest(py: str, args: list[str], junit: Path, verbose: bool = False) -> list[str]:
    return [py, "-m", "pytest", "-v" if verbose else "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfEs",
            f"--junitxml={junit}", *args]


def shards_for(cpus: Optional[int]) -> int:
    """Parallel kernel-test processes: one Triton compiler per core, two cores left for the GPU feeders."""
    return max(1, min(14, (cpus or 1) - 2))


def run_step(step: str, out: Path, cuda: bool, smoke: bool, state: dict) -> dict:
    """One step: ``{"step", "status": passed|failed|skipped, "seconds", "detail"}``."""
    t0 = time.time()
    # The limits bound a GPU machine's time; without one (CI, --cpu-smoke's interpreter) a loaded CPU gets more.
    deadline = t0 + LIMITS_S[step] * (1 if cuda else 4)
    log = out / f"{step}.log"
    py = sys.executable
    if step in GPU_STEPS and not cuda and not smoke:
        return {"step": step, "status": "skipped", "seconds": 0.0, "detail": "no CUDA device on this machine"}
    # compiled kernels on the GPU; the test suite's conftest would default the interpreter on (CPU runs)
    base = {"TRITON_INTERPRET": "1" if smoke else "0", "PTPEFT_FAST_NO_EXT": "1"}
    detail = ""
    if step == "env":
        rc = _run([py, "-c", ENV_CODE], log, deadline, _env())
    elif step == "imports":
        rc = _run([py, "-c", IMPORTS_CODE, str(ROOT)], log, deadline, _env())
    elif step == "ext":
        if smoke:
            return {"step": step, "status": "skipped", "seconds": 0.0,
                    "detail": "--cpu-smoke: the CUDA build is the point of this step"}
        rc = _run([py, "-c", EXT_CODE], log, deadline, _env())
        state["ext"] = rc == 0
        if rc == 124:  # slow, not broken: the CUDA spectrum opchecks skip; a build error fails the step
            return {"step": step, "status": "skipped", "seconds": round(time.time() - t0, 1),
                    "detail": f"the build did not finish within {LIMITS_S[step]} s; opcheck runs without it"}
    elif step == "kernel-tests":
        n = 2 if smoke else shards_for(os.cpu_count())
        args = ["-k", "grid and D256"] + KERNEL_TESTS[:1] if smoke else KERNEL_TESTS
        junits = [out / f"kernel-tests-{i}.xml" for i in range(n)]
        env = _env({**base, "PTPEFT_TRITON_CONFIG_LOG": str(out / "configs-used.jsonl")})
        logs = [out / f"kernel-tests-{i}.log" for i in range(n)]
        # -v: one line per finished test, so a shard stopped at the deadline still shows what failed
        procs = [_start(_pytest(py, args, junits[i], verbose=True), logs[i], {**env, "PTPEFT_TEST_SHARD": f"{i}/{n}"})
                 for i in range(n)]
        codes = _finish(procs, deadline)
        c = junit_counts(junits)
        if c["files"] < n:  # a shard without its JUnit file (killed): count its finished tests from the log
            for junit, shard_log in zip(junits, logs, strict=True):
                if not junit.is_file():
                    for key, n_ in verbose_counts(shard_log).items():
                        c[key] += n_
        # pytest exits 5 when a shard collected nothing (more shards than tests): not a failure
        rc = 0 if all(code in (0, 5) for code in codes) else 1
        detail = (f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped "
                  f"in {n} shards (exit codes {codes}; logs kernel-tests-*.log)")
        log.write_text(detail + "\n" + configs_summary(out / "configs-used.jsonl") + "\n")
    elif step == "opcheck":
        env = _env({**base, "PTPEFT_FAST_NO_EXT": "0" if state.get("ext") else "1"})
        rc = _run(_pytest(py, ["tests/test_compile.py", "-k", "cuda"], out / "opcheck.xml"), log, deadline, env)
    elif step == "train":
        node = TRAIN_TEST + ("[tiny]" if smoke else "[llama-2048]")
        env = _env({**base, "PTPEFT_GPU_CHECK_OUT": str(out)})
        rc = _run(_pytest(py, [node], out / "train.xml"), log, deadline, env)
    else:
        rc, detail = _bench(py, out, deadline, smoke, base)
    status = "passed" if rc == 0 else "failed"  # pytest's 5 (nothing collected) is a failure here
    return {"step": step, "status": status, "seconds": round(time.time() - t0, 1),
            "detail": (detail or _tail(log)) + (" [timed out]" if rc == 124 else "")}


def _bench(py: str, out: Path, deadline: float, smoke: bool, base: dict) -> tuple[int, str]:
    """Compile/autotune every case group in parallel processes (fills the on-disk kernel caches), then
    time them all in one process on a quiet GPU, then write BENCHMARKS-GPU.md."""
    script = str(ROOT / "benchmarks" / "gpu_bench.py")
    size = ["--size", "tiny"] if smoke else []
    cases = ["adapter"] if smoke else ["attention", "varlen", "lora", "adapter", "train"]
    env = _env(base)
    t0 = time.time()
    warm_deadline = t0 + 0.45 * (deadline - t0)  # a warm-up that overruns leaves the timed run its time
    # one process per case, the attention case split: our kernels' autotuning and Flex's inductor
    # compile are the two long compiles
    groups = [("attention-ours", ["--cases", "attention", "--only", "ours"]),
              ("attention-flex", ["--cases", "attention", "--only", "flex"])] if not smoke else []
    groups += [(c, ["--cases", c]) for c in cases if smoke or c != "attention"]
    _finish([_start([py, script, "--warm", *args, *size], out / f"bench-warm-{name}.log", env)
             for name, args in groups], warm_deadline)
    result = out / "gpu-bench.json"
    reps = ["--reps", "2", "--warmup", "1"] if smoke else []
    rc_bench = _run([py, script, "--json", str(result), "--cases", ",".join(cases), *size, *reps],
                    out / "bench.log", deadline - 15, env)  # 15 s kept for the report
    if not result.is_file():
        return (rc_bench or 1), _tail(out / "bench.log")
    # the report also for a run stopped at its limit: the JSON holds every result finished by then
    train = out / ("train-tiny.json" if smoke else "train-llama-2048.json")
    cmd = [py, str(ROOT / "benchmarks" / "report_gpu.py"), str(result), "-o", str(out / "BENCHMARKS-GPU.md"),
           "--command", "PYTHONPATH=. python tools/gpu_check.py", "--train", str(train)]
    rc = _run(cmd, out / "bench-report.log", max(deadline, time.time() + 10), env)
    if rc_bench != 0:
        why = _tail(out / "bench.log", 1)
        return rc_bench, f"benchmarks stopped (exit {rc_bench}; the report has what finished): {why}"
    return rc, _tail(out / "bench-report.log", 1) if rc == 0 else _tail(out / "bench-report.log")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="folder for the results (default: gpu-check/)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run each GPU step's machinery on CPU at test size (Triton interpreter): for the tests")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    results, state = [], {}
    t0 = time.time()
    for step in steps:
        print(f"[gpu_check] {step} (limit {LIMITS_S[step]} s) ...", flush=True)
        r = run_step(step, args.out, cuda, args.cpu_smoke, state)
        last = r["detail"].splitlines()[-1] if r["detail"] else ""
        print(f"[gpu_check] {step}: {r['status']} ({r['seconds']} s) {last}", flush=True)
        results.append(r)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# GPU check", "", f"Total {time.time() - t0:.0f} s; limits {LIMITS_S} (s).", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        last = (r["detail"].splitlines()[-1] if r["detail"] else "").replace("|", "\\|")
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {last} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
