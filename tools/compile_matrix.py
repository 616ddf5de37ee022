"""Compile every Triton kernel variant to cubin without a GPU and read its resources.

    python tools/compile_matrix.py --subset ci            # every kernel, first config, bf16, sm_80/90, D=128
    python tools/compile_matrix.py --write                # the full matrix -> docs/kernels-resources.md
    python tools/compile_matrix.py --kernel attn_dkdv --caps 90 --dtypes bf16,fp16

For each kernel an op can launch, each autotune config in its list, each constexpr branch
(causal / dropout / prefix / shared for attention; dropout / bias / dx for LoRA; activation for the
adapter), each dtype and head-dimension tile, and each target (sm_80, sm_90; sm_100 with
``--caps``), Triton's NVIDIA backend lowers the kernel to cubin (no driver needed) and the bundled
``cuobjdump -res-usage`` reads registers, stack (spill frame) and shared memory. Prints one line per
variant and exits non-zero when any variant fails to compile. ``--write`` replaces
docs/kernels-resources.md (generated: never edit it by hand).

Runs with ``TRITON_INTERPRET`` unset (the real compiler); it sets that up itself.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the real compiler, the GPU config lists
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Names of the integer (not pointer) scalar arguments, per kernel family.
INTS = {
    "attn": ("B", "H", "HKV", "L", "S", "P", "D", "GROUP", "NKEYS", "ROW_LEN", "COL_OFF"),
    "lora": ("M", "N", "K", "R"),
    "adapter": ("M", "D", "H"),
}
FP32_PTRS = ("LSE2", "DELTA", "T", "U", "Z", "DZ", "DBD", "DBU")
FLOATS = ("qk_scale", "scale", "scaling", "p_drop")
HEAD_TILES = {64: (64,), 128: (80, 96, 128), 256: (256,)}  # BLOCK_D -> the head dims it serves


@dataclass
class Variant:
    kernel: str  # e.g. attn_dkdv
    branch: str  # the constexpr branch, e.g. causal=True,dropout=False,prefix=True,shared=True
    jit: object
    consts: dict
    num_warps: int
    num_stages: int
    config: str  # the autotune config's tiles


def branches(dtype: str, block_d: int = 128):
    """``(kernel, branch, jit, constexprs without the autotuned tiles)`` for every constexpr branch."""
    from ptpeft_fast.kernels import adapter as AD
    from ptpeft_fast.kernels import lora as LO
    from ptpeft_fast.kernels import prefix_attention as PA

    prec = "ieee" if dtype == "fp32" else "tf32"
    f32 = dtype == "fp32"
    out = []
    for causal, drop in ((True, False), (False, True), (False, False)):
        base = dict(CAUSAL=causal, HAS_PAD=True, DROPOUT=drop, COMPUTE_F32=f32, PREC=prec, BLOCK_D=block_d)
        tag = f"causal={causal},dropout={drop}"
        out.append(("attn_fwd", tag, PA._attn_fwd, dict(base)))
        out.append(("attn_dq", tag, PA._attn_bwd_dq, dict(base)))
        for pre, shared in ((False, False), (True, True), (True, False)):
            out.append(("attn_dkdv", f"{tag},prefix={pre},shared={shared}", PA._attn_bwd_dkdv,
                        dict(base, IS_PREFIX=pre, BATCH_SHARED=shared)))
    for drop in (False, True):
        common = dict(DROPOUT=drop, COMPUTE_F32=f32, PREC=prec, BLOCK_R=16)
        out.append(("lora_fwd", f"dropout={drop}", LO._lora_fwd, dict(common, HAS_BIAS=True)))
        for need in (True, False):
            out.append(("lora_dx", f"dropout={drop},dx={need}", LO._lora_bwd_dx, dict(common, NEED_DX=need)))
        out.append(("lora_ab", f"dropout={drop}", LO._lora_bwd_ab, dict(common)))
    for act in (0, 1, 2):
        common = dict(ACT=act, COMPUTE_F32=f32, PREC=prec, BLOCK_H=64)
        out.append(("adapter_fwd", f"act={act}", AD._adapter_fwd, dict(common, HAS_BD=True, HAS_BU=True, RESIDUAL=True)))
        out.append(("adapter_dx", f"act={act}", AD._adapter_bwd_dx, dict(common, RESIDUAL=True)))
        out.append(("adapter_w", f"act={act}", AD._adapter_bwd_w, dict(common)))
    return out


def variants(dtype: str, block_d: int, first_config_only: bool):
    for kernel, branch, jit, consts in branches(dtype, block_d):
        configs = list(getattr(jit, "configs", []))
        for cfg in configs[:1] if first_config_only else configs:
            tiles = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.kwargs.items())
            yield Variant(kernel, branch, jit, {**consts, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                          f"{tiles},w={cfg.num_warps},s={cfg.num_stages}")


def compile_kernel(jit, consts: dict, dtype: str, cap: int, num_warps: int = 4, num_stages: int = 3):
    """Lower ``jit`` (a kernel or its autotuner) with constexprs ``consts`` to cubin for ``sm_<cap>``;
    pointer arguments take ``dtype`` unless :data:`FP32_PTRS` says otherwise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = jit
    while not isinstance(fn, JITFunction):  # unwrap the autotuner
        fn = fn.fn
    ints = INTS[fn.__name__.split("_")[1]]
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name[0].isupper() and not name.startswith("stride") and name not in ints:
            sig[name] = "*" + ("fp32" if name in FP32_PTRS else "i32" if name in ("KLO", "KHI") else dtype)
        else:
            sig[name] = "i32"
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(consts)), target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_variant(v: Variant, dtype: str, cap: int):
    return compile_kernel(v.jit, v.consts, dtype, cap, v.num_warps, v.num_stages)


def cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this Triton wheel does not bundle cuobjdump")
    return str(path)


def resources(cubin: bytes) -> dict:
    """``{"reg", "stack", "shared", "local"}`` of the cubin's kernel, from ``cuobjdump -res-usage``
    (its ``shared`` is static shared memory only; Triton's is dynamic: ``metadata.shared``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "reg" not in found:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG figure: {text[:300]}")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("ci", "full"), default="full",
                    help="ci: every kernel and branch with its first config, bf16, head dim 128")
    ap.add_argument("--caps", default="80,90", help="compute capabilities, e.g. 80,90,100")
    ap.add_argument("--dtypes", help="default: bf16 (ci) or fp16,bf16,fp32 (full)")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--write", action="store_true", help="write docs/kernels-resources.md")
    a = ap.parse_args(argv)
    ci = a.subset == "ci"
    caps = [int(c) for c in a.caps.split(",")]
    dtypes = (a.dtypes or ("bf16" if ci else "fp16,bf16,fp32")).split(",")
    block_ds = (128,) if ci else (64, 128, 256)
    rows, failures, t_all = [], 0, time.time()
    for cap, dtype, block_d in itertools.product(caps, dtypes, block_ds):
        seen = set()
        for v in variants(dtype, block_d, first_config_only=ci):
            if a.kernel and a.kernel not in v.kernel:
                continue
            if not v.kernel.startswith("attn"):
                if (v.kernel, v.branch, v.config) in seen:
                    continue  # the head tile only matters for attention
                seen.add((v.kernel, v.branch, v.config))
            heads = "/".join(map(str, HEAD_TILES[block_d])) if v.kernel.startswith("attn") else "-"
            t0 = time.time()
            try:
                kernel = compile_variant(v, dtype, cap)
                res = {**resources(kernel.asm["cubin"]), "shared": int(kernel.metadata.shared)}
            except Exception as e:  # report every failure, not just the first
                failures += 1
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                print(f"FAIL sm_{cap} {dtype} D={heads} {v.kernel}[{v.branch}] {v.config}: "
                      f"{type(cause).__name__}: {str(cause)[-400:]}", flush=True)
                rows.append((cap, dtype, heads, v, None, time.time() - t0))
                continue
            dt = time.time() - t0
            flag = "SPILL" if res.get("stack", 0) else "ok"
            print(f"{flag:5} sm_{cap} {dtype} D={heads} {v.kernel}[{v.branch}] {v.config}: reg={res['reg']} "
                  f"stack={res.get('stack', 0)} smem={res.get('shared', 0)} ({dt:.1f} s)", flush=True)
            rows.append((cap, dtype, heads, v, res, dt))
    spills = sum(1 for r in rows if r[4] and r[4].get("stack", 0))
    print(f"{len(rows)} variants, {failures} failed to compile, {spills} spill; {time.time() - t_all:.0f} s")
    if a.write:
        write_table(rows, ROOT / "docs" / "kernels-resources.md", " ".join(sys.argv[1:]) or "(full matrix)")
    return 1 if failures else 0


def write_table(rows, path: Path, how: str) -> None:
    import triton
    lines = ["# Kernel resources (generated)", "",
             f"Generated by `python tools/compile_matrix.py {how}` with Triton {triton.__version__}; do not edit by "
             "hand. Registers per thread and stack (spill frame, bytes per thread: 0 means no spill) from each "
             "cubin with `cuobjdump -res-usage`; shared memory per block as Triton allocates it "
             "(`metadata.shared`).", "",
             "| target | dtype | head dim | kernel | branch | config | registers | stack | shared | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cap, dtype, heads, v, res, dt in rows:
        if res is None:
            lines.append(f"| sm_{cap} | {dtype} | {heads} | {v.kernel} | {v.branch} | {v.config} | FAILED | | | {dt:.1f} |")
        else:
            lines.append(f"| sm_{cap} | {dtype} | {heads} | {v.kernel} | {v.branch} | {v.config} | {res['reg']} | "
                         f"{res.get('stack', 0)} | {res.get('shared', 0)} | {dt:.1f} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
