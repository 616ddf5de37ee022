"""GPU benchmarks of the Triton kernels against the peers a user would pick instead.

Skipped without CUDA. Run: ``pytest benchmarks/test_bench_gpu_kernels.py --benchmark-only``.

Each benchmark times this project's kernel (forward + backward, the training step's cost)
with pytest-benchmark and, in the same run on the same inputs, the peer, recording
``peer_ms`` and ``speedup = peer / ours`` in ``extra_info``:

- prefix attention: flash-attn (``causal=True`` aligns bottom-right when seqlen_k > seqlen_q,
  so [prefix; keys] is exactly design §2), xformers (our ``xformers_ops``), and SDPA with
  ``causal_lower_right`` over [prefix; keys] (all three must concatenate the prefix);
- LoRA: PEFT's unfused ``linear(x, W, b) + s · lora_B(lora_A(dropout(x)))``;
- Adapter: the unfused torch module chain ``x + up(act(down(x)))``.

Shapes: one Llama-7B layer (d = 4096, 32 heads × 128, 4k tokens), P = 32, r = 16,
adapter bottleneck 64, bf16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

DT = torch.bfloat16


def _ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` with CUDA events (after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _bench(benchmark, ours, peers: dict):
    def run():
        ours()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
    ours_ms = _ms(ours)
    benchmark.extra_info["ours_ms"] = ours_ms
    for name, fn in peers.items():
        if fn is None:
            continue
        peer_ms = _ms(fn)
        benchmark.extra_info[f"{name}_ms"] = peer_ms
        benchmark.extra_info[f"speedup_vs_{name}"] = peer_ms / ours_ms


# ---------------------------------------------------------------- prefix attention

ATTN_SHAPES = {
    "llama7b-1x4096": dict(B=1, H=32, Hkv=32, L=4096, P=32, D=128),
    "llama7b-8x512": dict(B=8, H=32, Hkv=32, L=512, P=32, D=128),
    "gqa8-2x2048": dict(B=2, H=32, Hkv=8, L=2048, P=32, D=128),
}


def _attn_inputs(B, H, Hkv, L, P, D):
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=DT).requires_grad_()  # noqa: E731
    return mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D), mk(Hkv, P, D), mk(Hkv, P, D)


def _fwd_bwd(fn, inputs):
    def step():
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return grads

    return step


def _concat(q, k, v, pk, pv):
    B = q.shape[0]
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
    return keys, vals


def _sdpa_lower_right(q, k, v, pk, pv):
    from torch.nn.attention.bias import causal_lower_right

    keys, vals = _concat(q, k, v, pk, pv)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=causal_lower_right(q.shape[2], keys.shape[2]))


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None

    def fn(q, k, v, pk, pv):
        B = q.shape[0]
        keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).transpose(1, 2)
        vals = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).transpose(1, 2)
        return flash_attn_func(q.transpose(1, 2), keys, vals, causal=True).transpose(1, 2)

    return fn


@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_bench_prefix_attention(benchmark, shape):
    from ptpeft_fast.ops import _backend, prefix_attention

    benchmark.group = f"prefix_attention-{shape}"
    inputs = _attn_inputs(**ATTN_SHAPES[shape])
    ours = _fwd_bwd(lambda *t: prefix_attention(*t, causal=True, backend="triton"), inputs)
    fa = _flash_attn()
    peers = {
        "sdpa_lower_right": _fwd_bwd(_sdpa_lower_right, inputs),
        "flash_attn": _fwd_bwd(fa, inputs) if fa is not None else None,
        "xformers": _fwd_bwd(lambda *t: prefix_attention(*t, causal=True, backend="xformers"), inputs)
        if _backend.xformers_available() else None,
    }
    _bench(benchmark, ours, peers)


# ----------------------------------------------------------------------------- LoRA


def _peft_lora(x, w, b, a, bb, s, drop):
    return F.linear(x, w, b) + s * F.linear(F.linear(F.dropout(x, drop), a), bb)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_bench_lora_linear(benchmark, tokens, dropout):
    from ptpeft_fast.ops import lora_linear

    benchmark.group = f"lora-{tokens}x4096-r16-p{dropout}"
    d, r = 4096, 16
    x = torch.randn(tokens, d, device="cuda", dtype=DT, requires_grad=True)
    w = torch.randn(d, d, device="cuda", dtype=DT) * d**-0.5  # frozen base weight
    b = torch.zeros(d, device="cuda", dtype=DT)
    a = (torch.randn(r, d, device="cuda", dtype=DT) * d**-0.5).requires_grad_()
    bb = (torch.randn(d, r, device="cuda", dtype=DT) * 0.01).requires_grad_()
    train = [x, a, bb]
    ours = _fwd_bwd(lambda *t: lora_linear(t[0], w, b, t[1], t[2], 2.0, dropout, backend="triton"), train)
    peft = _fwd_bwd(lambda *t: _peft_lora(t[0], w, b, t[1], t[2], 2.0, dropout), train)
    _bench(benchmark, ours, {"peft_unfused": peft})


# -------------------------------------------------------------------------- Adapter


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bench_adapter(benchmark, act):
    from ptpeft_fast.ops import adapter

    benchmark.group = f"adapter-4096x4096-h64-{act}"
    d, h, tokens = 4096, 64, 4096
    mk = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", dtype=DT) * sc).requires_grad_()  # noqa: E731
    x, wd, bd, wu, bu = mk(tokens, d), mk(h, d, sc=d**-0.5), mk(h), mk(d, h, sc=h**-0.5), mk(d)
    actf = {"relu": F.relu, "gelu": F.gelu}[act]
    ins = [x, wd, bd, wu, bu]
    ours = _fwd_bwd(lambda *t: adapter(*t, activation=act, backend="triton"), ins)
    unfused = _fwd_bwd(lambda x_, wd_, bd_, wu_, bu_: x_ + F.linear(actf(F.linear(x_, wd_, bd_)), wu_, bu_), ins)
    _bench(benchmark, ours, {"torch_unfused": unfused})
