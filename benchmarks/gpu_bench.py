"""GPU benchmarks of the Triton kernels against what a user would run instead, ratios in the same run.

    PYTHONPATH=. python benchmarks/gpu_bench.py --json gpu-bench.json [--cases attention,lora,adapter,train]
    PYTHONPATH=. python benchmarks/gpu_bench.py --warm --cases attention    # compile and autotune only
    PYTHONPATH=. python benchmarks/report_gpu.py gpu-bench.json -o BENCHMARKS-GPU.md

Plain Python (no pytest plugin: the GPU image may lack one). Every side runs forward + backward (the
training step's cost) on the same inputs in the same process, timed with CUDA events after warm-up,
median of the repetitions; each side's forward output is also compared with the float64 torch
reference (``err``), so a fast peer that computes something else shows. Sides:

- ``attention``: our Triton prefix attention against SDPA over [prefix; keys] with
  ``causal_lower_right`` on each back end forced alone (flash, efficient, cuDNN; one that cannot take
  the call is reported as skipped with SDPA's reason) and FlexAttention (``torch.compile``) with the
  prefix block mask ``kv < P or kv - P <= q + S - L``, and flash-attn / xformers where installed; the
  headline is one Llama-7B layer (32 heads x 128, 4k tokens, P = 32, bf16), plus a GQA shape.
- ``lora``: our fused LoRA linear against the bare frozen linear (the floor) and PEFT's LoRA layer.
- ``adapter``: our fused adapter against the unfused module chain ``x + up(act(down(x)))``.
- ``train``: one optimizer step of a patched Llama from config (8 layers x 2048, L = 2048) in stage
  ``prefix`` against PEFT's prefix tuning and in stage ``peft`` (prefix + LoRA) against PEFT's LoRA.

``--size tiny`` runs the same code at test shapes (on CPU: Triton in its interpreter, the CUDA-only
sides skipped with their reason): tests/test_gpu_bench.py. ``--warm`` runs each side once and writes
nothing: tools/gpu_check.py runs the case groups so in parallel first, filling Triton's and
inductor's on-disk caches, then times them in one process on a quiet GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("attention", "varlen", "lora", "adapter", "train")

#: the issue's targets: largest allowed time ratio ours / side (fwd + bwd)
TARGETS = {
    ("prefix_attention", "sdpa_flash"): 1.0,
    ("prefix_attention", "flex"): 0.9,
    ("prefix_attention_varlen", "dense_mask"): 0.2,
    ("lora_linear", "frozen_linear"): 1.05,
    ("lora_linear", "peft"): 0.8,
    ("adapter", "unfused"): 0.7,
}

SHAPES = {
    "full": {
        "attention": {"llama7b-1x4096": dict(B=1, H=32, Hkv=32, L=4096, P=32, D=128, headline=True),
                      "gqa-2x2048": dict(B=2, H=32, Hkv=8, L=2048, P=32, D=128)},
        "varlen": {"4096-32docs": dict(T=4096, docs=32, H=32, Hkv=8, P=32, D=128, headline=True)},
        "lora": {"4096x4096-r16": dict(tokens=4096, d=4096, r=16, p=0.0, headline=True),
                 "4096x4096-r16-dropout": dict(tokens=4096, d=4096, r=16, p=0.05)},
        "adapter": {"4096x4096-h64-gelu": dict(tokens=4096, d=4096, h=64, act="gelu", headline=True)},
        "train": {"llama-8x2048-L2048": dict(hidden=2048, inter=5632, layers=8, heads=16, kv=4, vocab=32000,
                                             L=2048, batch=1, P=32, r=16)},
    },
    "tiny": {
        "attention": {"tiny": dict(B=1, H=4, Hkv=2, L=20, P=4, D=16, headline=True)},
        "varlen": {"tiny": dict(T=24, docs=4, H=4, Hkv=2, P=3, D=16, headline=True)},
        "lora": {"tiny": dict(tokens=12, d=32, r=4, p=0.0, headline=True)},
        "adapter": {"tiny": dict(tokens=12, d=32, h=8, act="gelu", headline=True)},
        "train": {"tiny": dict(hidden=64, inter=96, layers=1, heads=4, kv=2, vocab=97, L=12, batch=1, P=4, r=4)},
    },
}


# ----------------------------------------------------------------------------------- timing


class Bench:
    """Times zero-argument callables: CUDA events on a GPU, ``perf_counter`` on CPU; median ms."""

    def __init__(self, device: str, reps: int, warmup: int, only: Optional[set] = None):
        self.device, self.reps, self.warmup, self.only = device, reps, warmup, only

    def wants(self, side: str) -> bool:
        """Whether ``side`` runs (``--only`` selects sides, for the parallel warm-up processes)."""
        return self.only is None or side in self.only

    def ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.reps):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 (inf when ``a`` is not finite)."""
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _side(bench: Bench, build: Callable[[], tuple[Callable, Callable]], ref: Optional[torch.Tensor],
          name: str = "ours") -> dict:
    """``{"ms", "err"}`` for one side, or ``{"skipped": why}`` when it cannot run here.

    ``build()`` returns ``(forward, step)``: ``forward()`` gives the output compared with ``ref``,
    ``step()`` runs forward + backward (what is timed).
    """
    if not bench.wants(name):
        return {"skipped": "not selected (--only)"}
    try:
        forward, step = build()
        with torch.no_grad():
            out = forward()
        err = None if ref is None else rel_err(out, ref)
        del out
        return {"ms": bench.ms(step), "err": err}
    except Exception as exc:  # a peer this stack or device lacks: say why, keep the others
        return {"skipped": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"}


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable, Callable]:
    """(forward, forward + backward with a fixed upstream gradient) of ``fn(*inputs)``."""
    def forward():
        return fn(*inputs)

    grad = {}

    def step():
        out = fn(*inputs)
        if "g" not in grad:
            grad["g"] = torch.randn_like(out)
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad["g"])

    return forward, step


# -------------------------------------------------------------------------------- attention


def prefix_mask_mod(P: int, S: int, L: int) -> Callable:
    """FlexAttention ``mask_mod`` of prefix attention over [prefix; keys]: every query sees the P prefix
    keys, and real key ``kv - P`` when it is at or before the query's bottom-right-aligned position."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx - P <= q_idx + S - L)

    return mask_mod


def _concat(q, k, v, pk, pv, repeat_kv: bool):
    """[prefix; keys] and [prefix; values] per sequence (what every peer has to build), heads repeated
    to q's for the peers without GQA."""
    B = q.shape[0]
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    g = q.shape[1] // k.shape[1]
    if repeat_kv and g > 1:
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
    return keys, vals


def _sdpa_side(backend_name: str) -> Callable:
    def fn(q, k, v, pk, pv):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        keys, vals = _concat(q, k, v, pk, pv, repeat_kv=True)
        with sdpa_kernel([getattr(SDPBackend, backend_name)]):  # this back end alone: SDPA raises if it cannot
            return F.scaled_dot_product_attention(q, keys, vals,
                                                  attn_mask=causal_lower_right(q.shape[2], keys.shape[2]))

    return fn


def _flex_side(q, k, pk, compile_: bool) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L, S, P = q.shape[2], k.shape[2], pk.shape[-2]
    block_mask = create_block_mask(prefix_mask_mod(P, S, L), None, None, L, P + S, device=q.device.type)
    attend = torch.compile(flex_attention) if compile_ else flex_attention
    gqa = q.shape[1] != k.shape[1]

    def fn(q, k, v, pk, pv):
        keys, vals = _concat(q, k, v, pk, pv, repeat_kv=False)
        return attend(q, keys, vals, block_mask=block_mask, enable_gqa=gqa)

    return fn


def _flash_attn_side() -> Callable:
    """flash-attn's ``flash_attn_func`` over [prefix; keys]: its ``causal=True`` aligns bottom-right when
    there are more keys than queries, which is prefix attention exactly."""
    from flash_attn import flash_attn_func

    def fn(q, k, v, pk, pv):
        keys, vals = _concat(q, k, v, pk, pv, repeat_kv=False)  # flash-attn takes GQA as is
        out = flash_attn_func(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), causal=True)
        return out.transpose(1, 2)

    return fn


def bench_attention(bench: Bench, device: str, shape: dict) -> dict:
    from ptpeft_fast import ops

    B, H, Hkv, L, P, D = (shape[k] for k in ("B", "H", "Hkv", "L", "P", "D"))
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16).requires_grad_()  # noqa: E731
    inputs = [mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D), mk(Hkv, P, D), mk(Hkv, P, D)]
    with torch.no_grad():
        ref = ops.prefix_attention(*(t.detach().double() for t in inputs), causal=True, backend="torch")
    ours = _side(bench, lambda: _fwd_bwd(lambda *t: ops.prefix_attention(*t, causal=True, backend="triton"),
                                         inputs), ref)
    peers = {}
    for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                          ("sdpa_cudnn", "CUDNN_ATTENTION")):
        if device != "cuda":
            peers[name] = {"skipped": "SDPA's flash / efficient / cuDNN back ends are CUDA only"}
            continue
        peers[name] = _side(bench, lambda b=backend: _fwd_bwd(_sdpa_side(b), inputs), ref, name)
    peers["flex"] = _side(bench, lambda: _fwd_bwd(_flex_side(inputs[0], inputs[1], inputs[3], device == "cuda"),
                                                  inputs), ref, "flex")
    # optional packages a user might pick instead: reported as not run where absent
    peers["flash_attn"] = _side(bench, lambda: _fwd_bwd(_flash_attn_side(), inputs), ref, "flash_attn")
    peers["xformers"] = _side(bench, lambda: _fwd_bwd(lambda *t: ops.prefix_attention(*t, causal=True,
                                                                                      backend="xformers"), inputs),
                            ref, "xformers")
    del ref
    return {"op": "prefix_attention", "ours": ours, "peers": peers,
            "what": "fwd+bwd; peers over the concatenated prefix (causal_lower_right / the prefix block mask)"}


# ---------------------------------------------------------------------------- packed documents


def document_prefix_mask_mod(P: int, cu: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod`` over [prefix; packed row]: every query sees the P prefix keys, and real
    key ``kv - P`` when it is in the query's document and at or before it."""
    doc = torch.searchsorted(cu[1:].long(), torch.arange(int(cu[-1]), device=cu.device), right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        j = (kv_idx - P).clamp(min=0)
        return (kv_idx < P) | ((doc[j] == doc[q_idx]) & (j <= q_idx))

    return mask_mod


def _flex_varlen_side(q, pk, cu: torch.Tensor, compile_: bool) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, P = q.shape[2], pk.shape[-2]
    block_mask = create_block_mask(document_prefix_mask_mod(P, cu.to(q.device)), None, None, T, P + T,
                                   device=q.device.type)
    attend = torch.compile(flex_attention) if compile_ else flex_attention

    def fn(q, k, v, pk, pv):
        keys, vals = _concat(q, k, v, pk, pv, repeat_kv=False)
        return attend(q, keys, vals, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    return fn


def _flash_attn_varlen_side(cu: torch.Tensor) -> Callable:
    """flash-attn's ``flash_attn_varlen_func`` with the prefix copied in front of every document's keys
    (its bottom-right causality then is prefix attention per document)."""
    from flash_attn import flash_attn_varlen_func

    spans = list(zip(cu.tolist(), cu.tolist()[1:], strict=False))

    def fn(q, k, v, pk, pv):
        P = pk.shape[-2]
        keys = torch.cat([t for s, e in spans for t in (pk, k[0, :, s:e])], 1).transpose(0, 1)
        vals = torch.cat([t for s, e in spans for t in (pv, v[0, :, s:e])], 1).transpose(0, 1)
        cu_k = torch.tensor([0] + [e - s + P for s, e in spans], device=q.device).cumsum(0).to(torch.int32)
        cu_q = cu.to(q.device)
        longest = max(e - s for s, e in spans)
        out = flash_attn_varlen_func(q[0].transpose(0, 1), keys, vals, cu_q, cu_k, longest, longest + P, causal=True)
        return out.transpose(0, 1).unsqueeze(0)

    return fn


def bench_varlen(bench: Bench, device: str, shape: dict) -> dict:
    from benchmarks.cases import document_offsets
    from ptpeft_fast import ops

    T, docs, H, Hkv, P, D = (shape[k] for k in ("T", "docs", "H", "Hkv", "P", "D"))
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    inputs = [mk(1, H, T, D), mk(1, Hkv, T, D), mk(1, Hkv, T, D), mk(Hkv, P, D), mk(Hkv, P, D)]
    cu = document_offsets(T, docs).to(device)
    with torch.no_grad():
        ref = ops.prefix_attention(*(t.detach().double() for t in inputs), causal=True, cu_seqlens=cu, backend="torch")
    mask = ops.document_mask(cu, T)
    ours = _side(bench, lambda: _fwd_bwd(lambda *t: ops.prefix_attention(*t, causal=True, cu_seqlens=cu), inputs),
                 ref)
    peers = {"dense_mask": _side(bench, lambda: _fwd_bwd(lambda *t: ops.prefix_attention(*t, causal=True,
                                                                                       attn_mask=mask), inputs),
                                 ref, "dense_mask"),
             "flex": _side(bench, lambda: _fwd_bwd(_flex_varlen_side(inputs[0], inputs[3], cu, device == "cuda"),
                                                   inputs), ref, "flex"),
             "flash_attn": _side(bench, lambda: _fwd_bwd(_flash_attn_varlen_side(cu), inputs), ref, "flash_attn")}
    del ref
    return {"op": "prefix_attention_varlen", "ours": ours, "peers": peers,
            "what": f"fwd+bwd over one packed row of {docs} documents; peers: the dense document mask, FlexAttention's "
                    "document mask over [prefix; row], flash-attn varlen with the prefix before each document"}


# ------------------------------------------------------------------------------------- LoRA


def _peft_lora_layer(weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                     p: float) -> torch.nn.Module:
    """PEFT's own LoRA layer around a frozen linear holding ``weight``/``bias``, with our A and B copied in."""
    import peft

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)

        def forward(self, x):
            return self.proj(x)

    host = One()
    with torch.no_grad():
        host.proj.weight.copy_(weight)
        host.proj.bias.copy_(bias)
    model = peft.get_peft_model(host, peft.LoraConfig(r=a.shape[0], lora_alpha=alpha, lora_dropout=p,
                                                      target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer.to(weight.dtype)


def bench_lora(bench: Bench, device: str, shape: dict) -> dict:
    from ptpeft_fast import ops

    n, d, r, p = shape["tokens"], shape["d"], shape["r"], shape["p"]
    alpha = 2.0 * r
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, torch.bfloat16)  # noqa: E731
    x = mk(n, d).requires_grad_()
    w, bias = mk(d, d, sc=d**-0.5), mk(d, sc=0.1)  # the frozen base layer
    a, b = mk(r, d, sc=d**-0.5).requires_grad_(), mk(d, r, sc=0.02).requires_grad_()
    with torch.no_grad():
        ref = ops.lora_linear(*(t.detach().double() for t in (x, w, bias, a, b)), alpha / r, backend="torch")
    # dropout draws differ between implementations: the output check is made without it
    check = ref if p == 0 else None
    ours = _side(bench, lambda: _fwd_bwd(lambda x_, a_, b_: ops.lora_linear(x_, w, bias, a_, b_, alpha / r, p,
                                                                             backend="triton"), [x, a, b]), check)
    frozen = _side(bench, lambda: _fwd_bwd(lambda x_: F.linear(x_, w, bias), [x]), None, "frozen_linear")

    def peft_build():
        layer = _peft_lora_layer(w, bias, a.detach(), b.detach(), alpha, p)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return _fwd_bwd(lambda x_, *_: layer(x_), [x, *params])

    peers = {"frozen_linear": frozen, "peft": _side(bench, peft_build, check, "peft")}
    return {"op": "lora_linear", "ours": ours, "peers": peers,
            "what": "fwd+bwd (grads of x, A, B; W frozen); frozen_linear = the bare base layer (the floor)"}


# ---------------------------------------------------------------------------------- adapter


def bench_adapter(bench: Bench, device: str, shape: dict) -> dict:
    from ptpeft_fast import ops

    n, d, h, act = shape["tokens"], shape["d"], shape["h"], shape["act"]
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device, torch.bfloat16).requires_grad_()  # noqa: E731
    ins = [mk(n, d), mk(h, d, sc=d**-0.5), mk(h, sc=0.1), mk(d, h, sc=h**-0.5), mk(d, sc=0.1)]
    with torch.no_grad():
        ref = ops.adapter(*(t.detach().double() for t in ins), activation=act, backend="torch")
    actf = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act]
    ours = _side(bench, lambda: _fwd_bwd(lambda *t: ops.adapter(*t, activation=act, backend="triton"), ins), ref)
    unfused = _side(bench, lambda: _fwd_bwd(lambda x, wd, bd, wu, bu: x + F.linear(actf(F.linear(x, wd, bd)), wu, bu),
                                            ins), ref, "unfused")
    return {"op": "adapter", "ours": ours, "peers": {"unfused": unfused},
            "what": "fwd+bwd (grads of x and all four adapter tensors)"}


# ------------------------------------------------------------------------------------ train


def _llama(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], vocab_size=shape["vocab"],
                      max_position_embeddings=max(128, shape["L"]))
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _train_step(model, ids, backend: Optional[str] = None) -> tuple[Callable, Callable]:
    import contextlib

    from ptpeft_fast import ops

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with ops.use_backend(backend) if backend else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

    def forward():
        with ops.use_backend(backend) if backend else contextlib.nullcontext():
            return model(input_ids=ids).logits.float()

    return forward, step


def bench_train(bench: Bench, device: str, shape: dict) -> dict:
    import peft

    import ptpeft_fast as pf

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["L"]), generator=g).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    sides = {}

    def ours(stage: str):
        def build():
            model = _llama(shape, device)
            pf.patch(model, {"prefix": {"num_tokens": shape["P"], "hidden_size": 512},
                             "lora": {"r": shape["r"], "targets": targets}})
            pf.set_stage(model, stage)
            return _train_step(model, ids, "triton")
        return build

    def theirs(cfg_fn):
        def build():
            model = peft.get_peft_model(_llama(shape, device), cfg_fn())
            model.train()
            return _train_step(model, ids)
        return build

    for name, build in (
        ("ours_prefix", ours("prefix")),
        ("peft_prefix_tuning", theirs(lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=shape["P"]))),
        ("ours_prefix_lora", ours("peft")),
        ("peft_lora", theirs(lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=shape["r"], lora_alpha=2 * shape["r"],
                                                     target_modules=targets))),
    ):
        sides[name] = _side(bench, build, None, name)
        if device == "cuda":
            torch.cuda.empty_cache()
    step = "one AdamW step (fwd + bwd + update) of a Llama from config"
    return [{"op": "train_step_prefix", "ours": sides["ours_prefix"],
             "peers": {"peft_prefix_tuning": sides["peft_prefix_tuning"]},
             "what": f"{step}; ours = stage 'prefix' (Triton); PEFT's prefix tuning feeds its prefix as past "
                     "key/values through SDPA"},
            {"op": "train_step_peft", "ours": sides["ours_prefix_lora"], "peers": {"peft_lora": sides["peft_lora"]},
             "what": f"{step}; ours = stage 'peft' (prefix + LoRA, Triton); PEFT's LoRA alone on the same "
                     "projections (no prefix: less work than ours)"}]


BENCHES = {"attention": bench_attention, "varlen": bench_varlen, "lora": bench_lora, "adapter": bench_adapter,
           "train": bench_train}


# -------------------------------------------------------------------------------------- run


def environment(device: str) -> dict:
    """Device and versions, for the report's header."""
    info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "python": sys.version.split()[0]}
    for mod in ("triton", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # absent or broken: say which
            info[mod] = f"unavailable ({type(exc).__name__})"
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # pragma: no cover - cuDNN absent
            info["cudnn"] = None
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


def run(cases: list[str], size: str, device: str, reps: int, warmup: int, only_shape: Optional[str] = None,
        json_path: Optional[Path] = None, only: Optional[set] = None) -> dict:
    """Every shape of each case (or only ``only_shape``): the JSON that report_gpu.py reads, rewritten to
    ``json_path`` after each result (a run stopped at its time limit leaves what it measured)."""
    bench = Bench(device, reps, warmup, only)
    results = []
    data = {"environment": environment(device), "size": size, "reps": reps, "warmup": warmup, "results": results,
            "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for case in cases:
        for shape_name, shape in SHAPES[size][case].items():
            if only_shape is not None and shape_name != only_shape:
                continue
            t0 = time.time()
            params = {k: v for k, v in shape.items() if k != "headline"}
            out = BENCHES[case](bench, device, params)
            for r in out if isinstance(out, list) else [out]:
                r.update(case=case, shape=shape_name, params=params, headline=bool(shape.get("headline")),
                         seconds=round(time.time() - t0, 1))
                for peer, side in r["peers"].items():
                    side["target"] = TARGETS.get((r["op"], peer))
                    if "ms" in side and "ms" in r["ours"]:
                        side["ratio"] = r["ours"]["ms"] / side["ms"]
                results.append(r)
                print(f"[gpu_bench] {case}/{shape_name}: {json.dumps(r, default=str)}", flush=True)
                if json_path is not None:
                    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
            if device == "cuda":
                torch.cuda.empty_cache()
    return data


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--size", choices=sorted(SHAPES), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="run every side once, time nothing, write nothing")
    ap.add_argument("--only", help="comma-separated sides to run (ours, sdpa_flash, flex, peft, ...); the rest skip")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    reps, warmup = (1, 0) if args.warm else (args.reps, args.warmup)
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    run(cases, args.size, args.device, reps, warmup, json_path=None if args.warm else args.json, only=only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
