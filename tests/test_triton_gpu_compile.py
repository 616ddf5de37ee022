"""Opt-in: compile every Triton kernel variant for sm_80 and sm_90 without a GPU.

The interpreter accepts code the real compiler rejects (e.g. an ``if/else`` whose branches
give one variable different shapes). This check lowers each kernel through Triton's NVIDIA
backend to cubin for a given target, no driver needed. It is slow (seconds to a minute per
variant), so it runs only with ``PTPEFT_COMPILE_CHECK=1``; ``PTPEFT_COMPILE_CAPS`` (default
``80,90``) and ``PTPEFT_COMPILE_DTYPES`` (default ``bf16``) choose the matrix. Also runnable
directly: ``python tests/test_triton_gpu_compile.py [name-filter]``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _jobs(dtype: str):
    from ptpeft_fast.kernels import adapter as AD
    from ptpeft_fast.kernels import lora as LO
    from ptpeft_fast.kernels import prefix_attention as PA

    prec = "ieee" if dtype == "fp32" else "tf32"
    f32 = dtype == "fp32"
    jobs = []
    for causal, drop in ((True, False), (False, True)):
        base = dict(CAUSAL=causal, HAS_PAD=True, DROPOUT=drop, COMPUTE_F32=f32, PREC=prec, BLOCK_D=128,
                    BLOCK_M=64 if f32 else 128, BLOCK_N=64)
        tag = f"causal={causal},dropout={drop}"
        jobs.append((f"attn_fwd[{tag}]", PA._attn_fwd, dict(base)))
        jobs.append((f"attn_dq[{tag}]", PA._attn_bwd_dq, dict(base, BLOCK_M=64)))
        for pre, shared in ((False, False), (True, True), (True, False)):
            jobs.append((f"attn_dkdv[{tag},prefix={pre},shared={shared}]", PA._attn_bwd_dkdv,
                         dict(base, BLOCK_M=64, IS_PREFIX=pre, BATCH_SHARED=shared)))
    tiles = dict(BLOCK_R=16, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)
    for drop in (False, True):
        common = dict(DROPOUT=drop, COMPUTE_F32=f32, PREC=prec)
        jobs.append((f"lora_fwd[dropout={drop}]", LO._lora_fwd, dict(common, HAS_BIAS=True, **tiles)))
        for need in (True, False):
            jobs.append((f"lora_dx[dropout={drop},dx={need}]", LO._lora_bwd_dx, dict(common, NEED_DX=need, **tiles)))
        jobs.append((f"lora_ab[dropout={drop}]", LO._lora_bwd_ab,
                     dict(common, BLOCK_R=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)))
    for act in (0, 1, 2):
        common = dict(ACT=act, COMPUTE_F32=f32, PREC=prec, BLOCK_H=64, BLOCK_M=64, BLOCK_K=64)
        jobs.append((f"adapter_fwd[act={act}]", AD._adapter_fwd, dict(common, HAS_BD=True, HAS_BU=True, RESIDUAL=True)))
        jobs.append((f"adapter_dx[act={act}]", AD._adapter_bwd_dx, dict(common, RESIDUAL=True)))
        jobs.append((f"adapter_w[act={act}]", AD._adapter_bwd_w, dict(common)))
    return jobs


def _compile(jit, dtype: str, consts: dict, cap: int):
    # the signature rules live in tools/compile_matrix.py (imported here, in the subprocess only:
    # importing it clears TRITON_INTERPRET)
    sys.path.insert(0, str(ROOT / "tools"))
    from compile_matrix import compile_kernel

    return compile_kernel(jit, consts, dtype, cap, num_warps=4, num_stages=3)


def main(argv: list[str]) -> int:
    only = argv[0] if argv else ""
    caps = [int(c) for c in os.environ.get("PTPEFT_COMPILE_CAPS", "80,90").split(",")]
    dtypes = os.environ.get("PTPEFT_COMPILE_DTYPES", "bf16").split(",")
    failures = 0
    for cap in caps:
        for dtype in dtypes:
            for name, jit, consts in _jobs(dtype):
                if only and only not in name:
                    continue
                try:
                    k = _compile(jit, dtype, dict(consts), cap)
                    print(f"ok   sm_{cap} {dtype} {name} smem={k.metadata.shared}", flush=True)
                except Exception as e:  # report every failure, not just the first
                    failures += 1
                    cause = e
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    print(f"FAIL sm_{cap} {dtype} {name}: {type(cause).__name__}: {str(cause)[-600:]}", flush=True)
    print(f"failures: {failures}")
    return 1 if failures else 0


@pytest.mark.skipif(os.environ.get("PTPEFT_COMPILE_CHECK") != "1", reason="opt-in: set PTPEFT_COMPILE_CHECK=1 (slow)")
def test_every_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main(sys.argv[1:]))
