"""pytest-benchmark entry to the GPU benchmarks (skipped without CUDA); the cases live in gpu_bench.py.

    pytest benchmarks/test_bench_gpu_kernels.py --benchmark-only --benchmark-json=gpu.json

Each test runs one shape of one case of :mod:`benchmarks.gpu_bench` (ours and every peer, timed with
CUDA events in the same run) and records, in ``extra_info``, ``ours_ms``, ``<peer>_ms``,
``speedup_vs_<peer>`` (peer time / ours) and ``target_vs_<peer>`` (the speed-up the issue's target asks),
which ``benchmarks/report.py`` reads; pytest-benchmark's own statistic is the wall time of the whole
case. The one-command GPU run (tools/gpu_check.py) calls gpu_bench.py directly and writes
BENCHMARKS-GPU.md with benchmarks/report_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

PARAMS = [(case, shape) for case in gpu_bench.CASES for shape in gpu_bench.SHAPES["full"][case]]


@pytest.mark.parametrize("case,shape", PARAMS, ids=[f"{c}-{s}" for c, s in PARAMS])
def test_bench_gpu(benchmark, case, shape):
    benchmark.group = f"gpu-{case}-{shape}"
    data = benchmark.pedantic(gpu_bench.run, args=([case], "full", "cuda", 20, 3, shape), rounds=1, iterations=1)
    info = benchmark.extra_info
    info["case"], info["shape"] = f"{case}-{shape}", shape
    for r in data["results"]:
        if "ms" not in r["ours"]:
            pytest.fail(f"{r['op']}: our side failed: {r['ours']['skipped']}")
        own = "" if len(data["results"]) == 1 else f"{r['op']}_"  # the train case has two results
        info[f"{own}ours_ms"] = r["ours"]["ms"]
        for peer, side in r["peers"].items():
            if "ms" not in side:
                info[f"{peer}_skipped"] = side["skipped"]
                continue
            info[f"{peer}_ms"] = side["ms"]
            info[f"speedup_vs_{peer}"] = side["ms"] / r["ours"]["ms"]
            if side.get("target"):
                info[f"target_vs_{peer}"] = 1.0 / side["target"]
