"""Compile every Triton kernel variant to cubin without a GPU, read its resources and check them.

    python tools/compile_matrix.py --subset ci --jobs 2   # what .ci/run runs
    python tools/compile_matrix.py --write                # the full matrix -> docs/kernels-resources.md
    python tools/compile_matrix.py --kernel attn_dkdv --caps 90 --dtypes bf16,fp16

Each kernel is reached through its launcher (``attn_forward``, ``lora_backward_dx``, ...) with small
CPU tensors shaped like a real call; the autotuner's launch is intercepted and its arguments are
specialised exactly as Triton's JIT does at a launch (an integer equal to 1 becomes a constant,
pointers and integers divisible by 16 get the divisibility hint), so a cubin here is the cubin a GPU
would build for that call. For every constexpr branch (causal / dropout / prefix / batch-shared
prefix for attention; dropout / bias / dX for LoRA; the activation for the adapter), dtype, shape
(head dim; LoRA rank; adapter bottleneck), target (sm_80, sm_90; sm_100 with ``--caps``) and every
autotune config that the kernel's shared-memory pruner keeps for that target, Triton's NVIDIA
backend lowers the kernel to cubin (no driver needed) and the bundled ``cuobjdump -res-usage``
reads registers and stack (spill frame); shared memory is Triton's ``metadata.shared``.

Checks (a violation is printed as ``VIOLATION`` with its reason and makes the exit status 1):

- every variant compiles;
- shared memory <= the target's per-block limit and <= the pruner's estimate for that config
  (the estimate must be an upper bound, or the autotuner launches configs that do not fit);
- no spill (stack 0) in fp16/bf16 on sm_80 and sm_90 for attention head dims <= 128 and every
  LoRA / adapter shape, unless the variant is listed in :data:`TOLERATED` with its reason.

``--write`` replaces docs/kernels-resources.md (generated: never edit it by hand). Runs with
``TRITON_INTERPRET`` unset (the real compiler, the GPU config lists); it sets that up itself.
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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the real compiler, the GPU config lists
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Attention head dims, grouped by the BLOCK_D tile that serves them (one cubin per group).
HEAD_DIMS = (64, 80, 96, 128, 256)
LORA_RANKS = (8, 16, 64)
ADAPTER_BOTTLENECKS = (64, 256)
# Attention (causal, dropout) branches and adapter activations (relu, gelu, silu).
ATTN_MODES = ((True, False), (False, True), (False, False))
ACTS = (0, 1, 2)
CI = dict(dtypes=("bf16",), head_dims=(128,), ranks=(16,), bottlenecks=(64,), attn_modes=ATTN_MODES, acts=ACTS)
FULL = dict(dtypes=("fp16", "bf16", "fp32"), head_dims=HEAD_DIMS, ranks=LORA_RANKS, bottlenecks=ADAPTER_BOTTLENECKS,
            attn_modes=ATTN_MODES, acts=ACTS)

# Variants allowed to spill, each with its reason (docs/kernels.md, "Registers, spills and shared
# memory", explains them). Keys: (kernel, shape, target cap, config); "*" matches any shape or config.
_FWD_128x64 = ("the forward's 128 x 64 tiles on sm_80 keep 8-16 B on the stack in the branches without dropout "
               "(255 registers; the dropout branch, which holds more, does not spill): kept as the one 128-row "
               "forward tile for A100, next to the spill-free 64 x 64; the autotuner measures both")
_ADAPTER_H256 = ("at bottleneck h = 256 the adapter's resident fp32 tiles sit at the pruner's register budget "
                 "(RESIDENT_REGS) and a few activation branches spill 8-48 B; h = 64 does not. Open: a narrower "
                 "entry for large h (e.g. 32 x 64 at 8 warps) and a budget per kernel, compiled and checked")
TOLERATED: dict[tuple[str, str, int, str], str] = {
    ("attn_fwd", "*", 80, "M=128,N=64,w=8,s=3"): _FWD_128x64,
    ("attn_fwd", "*", 80, "M=128,N=64,w=8,s=2"): _FWD_128x64,
    ("adapter_dx", "h=256", 90, "*"): _ADAPTER_H256,
    ("adapter_w", "h=256", 80, "*"): _ADAPTER_H256,
}


@dataclass
class Variant:
    """One compile: a kernel at one constexpr branch, shape, dtype, target and autotune config."""

    kernel: str  # e.g. attn_dkdv
    branch: str  # its constexpr branch, e.g. CAUSAL=1,DROPOUT=0,IS_PREFIX=1,BATCH_SHARED=1
    shape: str  # e.g. D=128, r=16, h=64
    dtype: str
    cap: int
    config: str  # the autotune config, e.g. M=64,N=64,w=4,s=3
    tuner: object = field(repr=False)
    cfg: object = field(repr=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    estimate: int = 0  # the pruner's shared-memory estimate, bytes
    res: dict | None = None  # registers, stack, shared
    error: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- launches


def capture(launch) -> list[tuple[object, tuple, dict]]:
    """Run ``launch()`` with every autotuned kernel launch intercepted: ``(autotuner, args, constexprs)``."""
    from triton.runtime.autotuner import Autotuner

    seen: list[tuple[object, tuple, dict]] = []

    def run(self, *args, **kwargs):
        seen.append((self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))

    real = Autotuner.run
    Autotuner.run = run
    try:
        launch()
    finally:
        Autotuner.run = real
    return seen


def attention_launches(dtype: torch.dtype, d: int, modes=ATTN_MODES, acts=ACTS):
    """(shape label, thunk) for the attention launchers: causal x dropout, per-batch and shared prefix."""
    from ptpeft_fast.kernels import prefix_attention as PA

    # Sizes that are not multiples of 16 (no divisibility hint: the conservative specialisation).
    B, H, HKV, L, S, P = 2, 4, 2, 200, 200, 24
    q, out, dout = (torch.zeros(B, H, L, d, dtype=dtype) for _ in range(3))
    k, v = (torch.zeros(B, HKV, S, d, dtype=dtype) for _ in range(2))
    lse2 = torch.zeros(B, H, L)
    klo, khi = torch.zeros(B, dtype=torch.int32), torch.full((B,), S, dtype=torch.int32)
    for causal, drop in modes:
        for shared in (False, True):
            pk, pv = (torch.zeros(*(() if shared else (B,)), HKV, P, d, dtype=dtype) for _ in range(2))
            kw = dict(causal=causal, scale=d ** -0.5, dropout_p=0.1 if drop else 0.0, seed=1)

            def go(pk=pk, pv=pv, kw=kw):
                PA.attn_forward(q, k, v, pk, pv, out, lse2, klo, khi, **kw)
                PA.attn_backward(q, k, v, pk, pv, out, dout, lse2, klo, khi, torch.empty_like(q),
                                 torch.empty_like(k), torch.empty_like(v), torch.empty_like(pk), torch.empty_like(pv),
                                 **kw)
            yield f"D={d}", go
    # packed documents (VARLEN): one row, causal, per-token document bounds; never with dropout (the
    # table sends packed documents with attention dropout to chunked: that branch spilled 8-32 B)
    q1, out1, dout1 = (torch.zeros(1, H, L, d, dtype=dtype) for _ in range(3))
    k1, v1 = (torch.zeros(1, HKV, L, d, dtype=dtype) for _ in range(2))
    lse1 = torch.zeros(1, H, L)
    lo, hi = torch.zeros(L, dtype=torch.int32), torch.full((L,), L, dtype=torch.int32)
    if any(causal and not drop for causal, drop in modes):
        for shared in (False, True):
            pk, pv = (torch.zeros(*(() if shared else (1,)), HKV, P, d, dtype=dtype) for _ in range(2))
            kw = dict(causal=True, scale=d ** -0.5, dropout_p=0.0, seed=1, varlen=True)

            def go(pk=pk, pv=pv, kw=kw):
                PA.attn_forward(q1, k1, v1, pk, pv, out1, lse1, lo, hi, **kw)
                PA.attn_backward(q1, k1, v1, pk, pv, out1, dout1, lse1, lo, hi, torch.empty_like(q1),
                                 torch.empty_like(k1), torch.empty_like(v1), torch.empty_like(pk),
                                 torch.empty_like(pv), **kw)
            yield f"D={d}", go


def lora_launches(dtype: torch.dtype, r: int, modes=ATTN_MODES, acts=ACTS):
    from ptpeft_fast.kernels import lora as LO

    M, N, K = 1000, 1024, 1024
    x, dx = torch.zeros(M, K, dtype=dtype), torch.zeros(M, K, dtype=dtype)
    w, bias = torch.zeros(N, K, dtype=dtype), torch.zeros(N, dtype=dtype)
    a, b = torch.zeros(r, K, dtype=dtype), torch.zeros(N, r, dtype=dtype)
    y, dy = torch.zeros(M, N, dtype=dtype), torch.zeros(M, N, dtype=dtype)
    t, u = torch.zeros(M, r), torch.zeros(M, r)
    for p in (0.0, 0.1):
        kw = dict(scaling=2.0, dropout_p=p, seed=1)

        def go(kw=kw):
            LO.lora_forward(x, w, bias, a, b, y, t, **kw)
            LO.lora_backward_dx(dy, w, a, b, dx, u, **kw)
            LO.lora_backward_dx(dy, w, a, b, None, u, **kw)
            LO.lora_backward_ab(x, dy, t, u, torch.empty_like(a), torch.empty_like(b), **kw)
        yield f"r={r}", go


def adapter_launches(dtype: torch.dtype, h: int, modes=ATTN_MODES, acts=ACTS):
    from ptpeft_fast.kernels import adapter as AD

    M, D = 1000, 1024
    x, y, dy, dx = (torch.zeros(M, D, dtype=dtype) for _ in range(4))
    wd, wu = torch.zeros(h, D, dtype=dtype), torch.zeros(D, h, dtype=dtype)
    bd, bu = torch.zeros(h, dtype=dtype), torch.zeros(D, dtype=dtype)
    z, dz = torch.zeros(M, h), torch.zeros(M, h)
    for act in acts:
        def go(act=act):
            AD.adapter_forward(x, wd, bd, wu, bu, y, z, act=act, residual=True)
            AD.adapter_backward_dx(dy, wd, wu, z, dx, dz, act=act, residual=True)
            AD.adapter_backward_w(x, dy, z, dz, torch.empty_like(wd), torch.empty_like(wu), torch.zeros(h),
                                  torch.zeros(D), act=act)
        yield f"h={h}", go


def cross_entropy_launches(dtype: torch.dtype, vocab: int, modes=ATTN_MODES, acts=ACTS):
    """The row kernel of the fused LM-head loss: fp32 logits chunks whatever the model's dtype."""
    from ptpeft_fast.kernels import cross_entropy as CE

    R = 170  # the rows of one 32 MiB chunk at V = 49152
    z = torch.zeros(R, vocab)
    t = torch.zeros(R, dtype=torch.long)
    lse, zy, scale = torch.zeros(R), torch.zeros(R), torch.zeros(R)

    def go():
        CE.ce_rows_(z, t, scale, lse, zy)
        CE.ce_rows_(z, t, None, lse, zy)
    yield f"V={vocab}", go


# -------------------------------------------------------------------------------------------- specialise

_SHAPE_CONSTS = ("COMPUTE_F32", "PREC")  # follow from the dtype; not part of the branch label


def kernel_name(fn) -> str:
    """``_attn_bwd_dkdv`` -> ``attn_dkdv``; ``_lora_fwd`` -> ``lora_fwd``."""
    return fn.__name__.lstrip("_").replace("bwd_", "")


def specialise(tuner, args: tuple, consts: dict):
    """``(fn, signature, constexprs, attrs)`` as Triton's JIT specialises this launch."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, native_specialize_impl

    fn = tuner
    while not isinstance(fn, JITFunction):  # unwrap the autotuner (and any heuristics)
        fn = fn.fn
    bound = dict(zip(fn.arg_names, args, strict=False))  # constexprs come as keywords
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts or name not in bound:
            sig[name] = "constexpr"
            constexprs[name] = consts.get(name)  # autotuned tiles are filled in per config
            continue
        ty, spec = native_specialize_impl(BaseBackend, bound[name], False, True, True)
        if ty == "constexpr":  # an integer equal to 1
            sig[name], constexprs[name] = "constexpr", spec
        else:
            sig[name] = ty
            if isinstance(spec, str) and "D" in spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, sig, constexprs, attrs


def config_label(cfg) -> str:
    tiles = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.kwargs.items())
    reg = f",maxnreg={cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else ""
    return f"{tiles},w={cfg.num_warps},s={cfg.num_stages}{reg}"


def variants(families, dtypes, caps, head_dims, ranks, bottlenecks, first_only: bool, only: str = "",
             attn_modes=ATTN_MODES, acts=ACTS):
    """Every :class:`Variant` of the matrix: the configs each kernel's pruner keeps for each target."""
    from ptpeft_fast.kernels._common import SMEM_PER_BLOCK

    gens = {"attn": (attention_launches, head_dims), "lora": (lora_launches, ranks),
            "adapter": (adapter_launches, bottlenecks), "ce": (cross_entropy_launches, (49152,))}
    out: dict[tuple, Variant] = {}
    for fam in families:
        gen, sizes = gens[fam]
        for dtype, size in itertools.product(dtypes, sizes):
            for shape, go in gen(DTYPES[dtype], size, attn_modes, acts):
                for tuner, args, consts in capture(go):
                    fn, sig, constexprs, attrs = specialise(tuner, args, consts)
                    name = kernel_name(fn)
                    if only and only not in name:
                        continue
                    branch = ",".join(f"{k}={int(v)}" for k, v in consts.items()
                                      if not k.startswith("BLOCK_") and k not in _SHAPE_CONSTS)
                    named = {**dict(zip(fn.arg_names, args, strict=False)), **consts}
                    pruner = tuner.early_config_prune
                    for cap in caps:
                        kept = pruner.keep(tuner.configs, named, SMEM_PER_BLOCK[cap])
                        for cfg in kept[:1] if first_only else kept:
                            # one cubin per specialisation: shapes that specialise alike share a row
                            key = (cap, dtype, name, branch, config_label(cfg), repr(sorted(sig.items())),
                                   repr(sorted(attrs.items())), repr(sorted(constexprs.items(), key=str)))
                            if key in out:
                                sizes = out[key].shape.split("=")[1].split("/")
                                if shape.split("=")[1] not in sizes:
                                    out[key].shape += "/" + shape.split("=")[1]
                                continue
                            out[key] = Variant(name, branch, shape, dtype, cap, config_label(cfg), tuner, cfg,
                                               sig, {**constexprs, **cfg.kwargs}, attrs,
                                               estimate=int(pruner.estimate(named, cfg)))
    return list(out.values())


# --------------------------------------------------------------------------------------------- compile


def compile_variant(v: Variant):
    """Lower ``v`` to cubin for ``sm_<cap>`` (no driver needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = v.tuner
    while not hasattr(fn, "arg_names") or not hasattr(fn, "src"):
        fn = fn.fn
    opts = {"num_warps": v.cfg.num_warps, "num_stages": v.cfg.num_stages}
    if getattr(v.cfg, "maxnreg", None):
        opts["maxnreg"] = v.cfg.maxnreg
    src = ASTSource(fn=fn, signature=v.signature, constexprs=dict(v.constexprs), attrs=v.attrs)
    return triton.compile(src, target=GPUTarget("cuda", v.cap, 32), options=opts)


def cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this Triton wheel does not bundle cuobjdump")
    return str(path)


def resources(cubin: bytes) -> dict:
    """``{"reg", "stack", ...}`` of the cubin's kernel from ``cuobjdump -res-usage`` (its ``shared`` is
    static shared memory only; Triton's is dynamic, so callers take ``metadata.shared``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "reg" not in found:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG figure: {text[:300]}")
    return found


def run_one(v: Variant) -> Variant:
    t0 = time.time()
    try:
        kernel = compile_variant(v)
        v.res = {**resources(kernel.asm["cubin"]), "shared": int(kernel.metadata.shared)}
    except Exception as e:  # report every failure, not just the first
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        v.error = f"{type(cause).__name__}: {str(cause)[-400:]}"
    v.seconds = time.time() - t0
    return v


_POOL_VARIANTS: list[Variant] = []


def _run_index(i: int) -> tuple[int, dict | None, str, float]:
    v = run_one(_POOL_VARIANTS[i])
    return i, v.res, v.error, v.seconds


def run_all(vs: list[Variant], jobs: int):
    """Compile ``vs`` (``jobs`` processes), yielding each variant once its figures are in."""
    if jobs <= 1:
        for v in vs:
            yield run_one(v)
        return
    import multiprocessing as mp

    _POOL_VARIANTS[:] = vs  # inherited by the forked workers; only indices cross the pipe
    with mp.get_context("fork").Pool(jobs) as pool:
        for i, res, err, dt in pool.imap_unordered(_run_index, range(len(vs))):
            vs[i].res, vs[i].error, vs[i].seconds = res, err, dt
            yield vs[i]


# ----------------------------------------------------------------------------------------------- checks


def spill_checked(v: Variant) -> bool:
    """Whether the no-spill rule covers ``v``: fp16/bf16 on sm_80/sm_90, attention head dims <= 128."""
    if v.dtype not in ("fp16", "bf16") or v.cap not in (80, 90):
        return False
    return not v.kernel.startswith("attn") or int(v.shape[2:].split("/")[-1]) <= 128


def tolerated(v: Variant) -> str:
    """The reason :data:`TOLERATED` gives for ``v``'s spill, or ``""``."""
    for (kernel, shape, cap, config), why in TOLERATED.items():
        if (kernel, cap) == (v.kernel, v.cap) and shape in ("*", v.shape) and config in ("*", v.config):
            return why
    return ""


def violations(v: Variant) -> list[str]:
    """Each rule ``v`` breaks, in words (empty when it passes)."""
    from ptpeft_fast.kernels._common import SMEM_PER_BLOCK

    if v.res is None:
        return [f"does not compile: {v.error}"]
    out = []
    smem, limit = v.res.get("shared", 0), SMEM_PER_BLOCK[v.cap]
    if smem > limit:
        out.append(f"shared memory {smem} B > the sm_{v.cap} limit {limit} B")
    if smem > v.estimate:
        out.append(f"shared memory {smem} B > the pruner's estimate {v.estimate} B")
    if v.res.get("stack", 0) and spill_checked(v) and not tolerated(v):
        out.append(f"spills: {v.res['stack']} B stack at {v.res['reg']} registers")
    return out


def describe(v: Variant) -> str:
    return f"sm_{v.cap} {v.dtype} {v.shape} {v.kernel}[{v.branch}] {v.config}"


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("ci", "full"), default="full",
                    help="ci: every kernel and constexpr branch at the first config its pruner keeps, bf16, "
                         "head dim 128, LoRA r=16, adapter h=64")
    ap.add_argument("--configs", choices=("first", "all"),
                    help="the first config each pruner keeps, or all it keeps (default: first for ci, all for full)")
    ap.add_argument("--caps", default="80,90", help="compute capabilities, e.g. 80,90,100")
    ap.add_argument("--dtypes", help="default: bf16 (ci) or fp16,bf16,fp32 (full)")
    ap.add_argument("--families", default="attn,lora,adapter,ce", help="kernel families, e.g. attn,lora")
    ap.add_argument("--head-dims", help="attention head dims, e.g. 64,128 (default: the subset's)")
    ap.add_argument("--ranks", help="LoRA ranks, e.g. 8,16 (default: the subset's)")
    ap.add_argument("--bottlenecks", help="adapter bottlenecks, e.g. 64,256 (default: the subset's)")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--no-check", action="store_true", help="report only: exit 0 unless something fails to compile")
    ap.add_argument("--write", action="store_true", help="write docs/kernels-resources.md")
    a = ap.parse_args(argv)
    ci = a.subset == "ci"
    sizes = dict(CI if ci else FULL)
    for name in ("head_dims", "ranks", "bottlenecks"):
        given = getattr(a, name)
        if given:
            sizes[name] = tuple(int(x) for x in given.split(","))
    dtypes = a.dtypes.split(",") if a.dtypes else sizes["dtypes"]
    t_all = time.time()
    vs = variants(a.families.split(","), dtypes, [int(c) for c in a.caps.split(",")], sizes["head_dims"],
                  sizes["ranks"], sizes["bottlenecks"], first_only=(a.configs or ("first" if ci else "all")) == "first",
                  only=a.kernel, attn_modes=sizes["attn_modes"], acts=sizes["acts"])
    print(f"{len(vs)} variants", flush=True)
    bad = 0
    for v in run_all(vs, a.jobs):
        broken = violations(v)
        if v.res is None:
            print(f"FAIL  {describe(v)}: {v.error}", flush=True)
        else:
            flag = "SPILL" if v.res.get("stack", 0) else "ok"
            print(f"{flag:5} {describe(v)}: reg={v.res['reg']} stack={v.res.get('stack', 0)} "
                  f"smem={v.res.get('shared', 0)} est={v.estimate} ({v.seconds:.1f} s)", flush=True)
        for why in broken if not a.no_check or v.res is None else []:
            bad += 1
            print(f"VIOLATION {describe(v)}: {why}", flush=True)
    failed = sum(v.res is None for v in vs)
    spills = sum(1 for v in vs if v.res and v.res.get("stack", 0))
    print(f"{len(vs)} variants, {failed} failed to compile, {spills} spill "
          f"({sum(1 for v in vs if v.res and v.res.get('stack', 0) and tolerated(v))} tolerated), "
          f"{bad} violations; {time.time() - t_all:.0f} s")
    if a.write:
        write_table(vs, ROOT / "docs" / "kernels-resources.md", " ".join(sys.argv[1:]), time.time() - t_all)
    return 1 if bad else 0


def write_table(vs: list[Variant], path: Path, how: str, seconds: float) -> None:
    import triton
    lines = ["# Kernel resources (generated)", "",
             f"Generated by `python tools/compile_matrix.py {how}` with Triton {triton.__version__} and PyTorch "
             f"{torch.__version__.split('+')[0]} on a CPU-only machine (this run: {seconds:.0f} s); "
             "do not edit by hand. "
             "Each row is one cubin: a kernel at one constexpr branch, shape, dtype, target and autotune config "
             "that the kernel's shared-memory pruner keeps for that target, compiled with the specialisation a "
             "launch with those shapes gets. Registers per thread and stack (spill frame, bytes per thread: 0 "
             "means no spill) from `cuobjdump -res-usage`; shared memory per block as Triton allocates it "
             "(`metadata.shared`) next to the pruner's estimate; compile seconds are 0 where Triton's cache "
             "already held the cubin. `check` is the tool's verdict (docs/kernels.md explains the rules and "
             "any tolerated spill).", "",
             "| target | dtype | shape | kernel | branch | config | registers | stack | shared | estimate | check "
             "| compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in vs:
        broken = violations(v)
        spill = bool(v.res and v.res.get("stack"))
        if broken:
            check = "; ".join(broken)
        elif spill:
            check = "tolerated" if tolerated(v) else "spill (outside the no-spill rule)"
        else:
            check = "ok"
        if v.res is None:
            figures = "FAILED | | "
        else:
            figures = f"{v.res['reg']} | {v.res.get('stack', 0)} | {v.res.get('shared', 0)}"
        lines.append(f"| sm_{v.cap} | {v.dtype} | {v.shape} | {v.kernel} | {v.branch} | {v.config} | {figures} | "
                     f"{v.estimate} | {check} | {v.seconds:.1f} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
