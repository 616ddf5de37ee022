"""Each CPU implementation of prefix attention against the one it would fall back to, paired.

    python benchmarks/impl_table.py [--rounds 7] [--quick]

For every shape (B=4 H=8 D=64 P=32 unless said; fp32 and bf16; causal, with and without a left-
padding mask; L = 128 ... 4096; decode steps with one query over a cache) it times forward +
backward (forward only for decode) of every implementation the dispatch table lets run, in
alternating rounds, and prints the median time and the median paired ratio to the implementation
that runs when the first one declines (its fallback in the table). The table in docs/kernels.md
comes from this script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptpeft_fast import ops  # noqa: E402

ORDER = ("decode_cpp", "block_cpp", "lse_merge", "chunked", "torch")


def _inputs(B, H, L, S, P, D, dtype, pad, grad):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)  # noqa: E731
    q, k, v, pk, pv = mk(B, H, L, D), mk(B, H, S, D), mk(B, H, S, D), mk(H, P, D), mk(H, P, D)
    mask = None
    if pad:
        mask = torch.ones(B, 1, L, S, dtype=torch.bool).tril(S - L)
        mask[1:, ..., : S // 4] = False
    return (q, k, v, pk, pv), mask


def _runner(impl, tensors, mask, grad):
    go = torch.randn(tensors[0].shape).to(tensors[0].dtype)

    def run():
        with torch.set_grad_enabled(grad):
            out = ops.prefix_attention(*tensors, causal=True, attn_mask=mask, backend=impl)
            if grad:
                torch.autograd.grad(out, tensors, go)

    return run


def measure(B, H, L, S, P, D, dtype, pad, grad, rounds):
    tensors, mask = _inputs(B, H, L, S, P, D, dtype, pad, grad)
    impls = [i for i in ORDER if ops.explain(ops.prefix_attention, *tensors, causal=True, attn_mask=mask,
                                             backend=i).chosen == i]
    if L * S > 1024 * 1024:
        impls = [i for i in impls if i != "torch"]  # the reference materialises [B, H, L, P+S]
    runs = {i: _runner(i, tensors, mask, grad) for i in impls}
    times = {i: [] for i in impls}
    for r in range(rounds + 1):
        for i in impls:
            t0 = time.perf_counter()
            runs[i]()
            if r:  # round 0 warms up
                times[i].append(time.perf_counter() - t0)
    return impls, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--only", choices=("training", "decode"), help="only the fwd+bwd shapes or only decode")
    a = ap.parse_args(argv)
    shapes = [(4, 8, L, L, 32, 64) for L in ((128, 512) if a.quick else (128, 512, 2048, 4096))]
    print("| shape | dtype | mask | implementation | median ms | vs next in table |")
    print("|---|---|---|---|---|---|")
    cases = [(s, dt, pad, True) for s in shapes for dt in (torch.float32, torch.bfloat16) for pad in (False, True)]
    cases += [((4, 8, 1, S, 32, 64), dt, pad, False)
              for S in (64, 512, 2048) for dt in (torch.float32,) for pad in (False, True)]
    if a.only:
        cases = [c for c in cases if c[3] == (a.only == "training")]
    for (B, H, L, S, P, D), dt, pad, grad in cases:
        if dt == torch.bfloat16 and L >= 2048 and a.quick:
            continue
        impls, times = measure(B, H, L, S, P, D, dt, pad, grad, a.rounds)
        med = {i: statistics.median(t) for i, t in times.items()}
        what = f"B={B} H={H} L={L} S={S} P={P} D={D} {'fwd+bwd' if grad else 'fwd (decode)'}"
        for n, i in enumerate(impls):
            nxt = impls[n + 1] if n + 1 < len(impls) else None
            ratio = ""
            if nxt:
                ratio = f"{statistics.median([x / y for x, y in zip(times[i], times[nxt], strict=True)]):.2f}× {nxt}"
            print(f"| {what} | {str(dt).split('.')[-1]} | {'padding' if pad else 'causal'} | {i} | "
                  f"{med[i] * 1e3:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
