"""The GPU run's parts that run on CPU: BENCHMARKS-GPU.md from a synthetic benchmark JSON, the
FlexAttention peer's prefix mask against the torch reference, the benchmark sides at test size, the
test sharding and the one-config-per-test autotune hook the compiled kernel tests use."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_bench, report_gpu  # noqa: E402


def _synthetic() -> dict:
    return {
        "environment": {"device": "NVIDIA H200", "capability": "sm_90", "torch": "2.11.0", "triton": "3.6.0",
                        "transformers": "5.17.0", "peft": "0.17.0", "cuda_runtime": "13.0"},
        "reps": 20, "warmup": 3, "datetime": "2026-12-03T17:00:00Z",
        "results": [
            {"case": "attention", "op": "prefix_attention", "shape": "llama7b-1x4096", "headline": True,
             "params": {"L": 4096}, "what": "fwd+bwd", "seconds": 12.0,
             "ours": {"ms": 2.0, "err": 3e-3},
             "peers": {"sdpa_flash": {"ms": 2.5, "err": 3e-3, "target": 1.0, "ratio": 0.8},
                       "sdpa_cudnn": {"skipped": "RuntimeError: No available kernel.", "target": None},
                       "flex": {"ms": 2.1, "err": 3e-3, "target": 0.9, "ratio": 2.0 / 2.1}}},
            {"case": "lora", "op": "lora_linear", "shape": "4096x4096-r16", "headline": True, "params": {},
             "ours": {"ms": 1.0, "err": 2e-3},
             "peers": {"frozen_linear": {"ms": 0.97, "err": None, "target": 1.05, "ratio": 1.0 / 0.97}}},
        ],
    }


def test_report_states_device_versions_ratios_and_verdicts(tmp_path):
    text = report_gpu.render(_synthetic(), command="PYTHONPATH=. python tools/gpu_check.py")
    assert "- device: NVIDIA H200" in text and "- triton: 3.6.0" in text and "- transformers: 5.17.0" in text
    assert "| prefix_attention | llama7b-1x4096 | sdpa_flash | 2.000 ms | 2.500 ms | 0.800× | ≤ 1× | met |" in text
    # 2.0 / 2.1 = 0.952 > 0.9: missed, and said so
    assert "| prefix_attention | llama7b-1x4096 | flex | 2.000 ms | 2.100 ms | 0.952× | ≤ 0.9× | **missed** |" in text
    assert "| sdpa_cudnn | not run: RuntimeError: No available kernel. |" in text
    assert "| lora_linear | 4096x4096-r16 | frozen_linear | 1.000 ms | 0.970 ms | 1.031× | ≤ 1.05× | met |" in text
    assert "Failures of our own sides" not in text


def test_report_exit_status_flags_a_failed_own_side(tmp_path):
    data = _synthetic()
    data["results"][1]["ours"] = {"skipped": "OutOfResources: shared memory"}
    src = tmp_path / "bench.json"
    src.write_text(__import__("json").dumps(data))
    assert report_gpu.main([str(src), "-o", str(tmp_path / "B.md")]) == 1
    text = (tmp_path / "B.md").read_text()
    assert "FAILED: OutOfResources: shared memory" in text and "- lora/4096x4096-r16: OutOfResources" in text


def test_flex_prefix_mask_is_the_reference_semantics():
    """The FlexAttention peer attends like prefix_attention (the torch reference), at L < S, L = S, L > S."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from ptpeft_fast import ops

    for L, S, P in ((5, 9, 3), (8, 8, 4), (9, 4, 2)):
        mask = flex.create_mask(gpu_bench.prefix_mask_mod(P, S, L), 1, 1, L, P + S, device="cpu")[0, 0]
        real = torch.ones(L, S, dtype=torch.bool).tril(S - L)  # bottom-right causal over the real keys
        assert torch.equal(mask, torch.cat([torch.ones(L, P, dtype=torch.bool), real], 1)), (L, S, P)
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, 4, n, 16, generator=g) for n in (L, S, S))
        pk, pv = torch.randn(2, 2, P, 16, generator=g)
        k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads over 2 key heads
        fn = gpu_bench._flex_side(q, k, pk, compile_=False)
        ref = ops.prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(), causal=True,
                                   backend="torch")
        assert gpu_bench.rel_err(fn(q, k, v, pk, pv), ref) < 1e-5


def test_varlen_peers_are_the_reference_semantics():
    """The packed-documents peers a GPU run times (FlexAttention's document mask over [prefix; row];
    the dense-mask side) compute what prefix_attention(cu_seqlens=...) defines."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from ptpeft_fast import ops

    res = gpu_bench.run(["varlen"], "tiny", "cpu", reps=1, warmup=0)["results"][0]
    assert res["ours"]["err"] < 1e-5 and res["peers"]["dense_mask"]["err"] < 1e-5, res
    assert "skipped" in res["peers"]["flash_attn"] or res["peers"]["flash_attn"]["err"] < 1e-2
    # FlexAttention has no backward on CPU: its mask checked through the forward
    g = torch.Generator().manual_seed(0)
    from benchmarks.cases import document_offsets

    cu = document_offsets(24, 4)
    q, k, v = torch.randn(1, 4, 24, 16, generator=g), *torch.randn(2, 1, 2, 24, 16, generator=g)
    pk, pv = torch.randn(2, 2, 3, 16, generator=g)
    out = gpu_bench._flex_varlen_side(q, pk, cu, compile_=False)(q, k, v, pk, pv)
    ref = ops.prefix_attention(*(t.double() for t in (q, k, v, pk, pv)), causal=True, cu_seqlens=cu,
                               backend="torch")
    assert gpu_bench.rel_err(out, ref) < 1e-5


def test_sdpa_sides_and_peft_layer_compute_the_reference_function():
    """The peers a GPU run times compute what ours does (on CPU SDPA's math back end stands in)."""
    from ptpeft_fast import ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 7, 16, generator=g) for _ in range(3))
    pk, pv = torch.randn(2, 4, 3, 16, generator=g)
    out = gpu_bench._sdpa_side("MATH")(q, k, v, pk, pv)  # the flash / efficient / cuDNN sides' code, on CPU
    ref = ops.prefix_attention(*(t.double() for t in (q, k, v, pk, pv)), causal=True, backend="torch")
    assert gpu_bench.rel_err(out, ref) < 1e-5
    pytest.importorskip("peft")
    x, w, b = torch.randn(5, 12, generator=g), torch.randn(12, 12, generator=g), torch.randn(12, generator=g)
    a, bb = torch.randn(4, 12, generator=g), torch.randn(12, 4, generator=g)
    layer = gpu_bench._peft_lora_layer(w, b, a, bb, alpha=8.0, p=0.0)
    ref = ops.lora_linear(*(t.double() for t in (x, w, b, a, bb)), 2.0, backend="torch")
    assert gpu_bench.rel_err(layer(x), ref) < 1e-5


def test_test_shards_partition_the_collection():
    """PTPEFT_TEST_SHARD=i/n keeps every n-th test: the shards are disjoint and cover the collection (a
    module that imports no torch, to keep the three collections quick)."""
    def collect(shard=None):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PTPEFT_TEST_SHARD", None)
        if shard:
            env["PTPEFT_TEST_SHARD"] = shard
        res = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                              "tests/test_layering.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        return {line for line in res.stdout.splitlines() if "::" in line}

    everything = collect()
    parts = [collect(f"{i}/2") for i in range(2)]
    assert len(everything) >= 3 and set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything)


def test_autotune_hook_finds_every_autotuned_kernel():
    """The one-config-per-test hook (tests/conftest.py) patches what Triton's Autotuner has on 3.6 and 3.9."""
    pytest.importorskip("triton")
    import conftest

    tuners = conftest._autotuners()
    names = {getattr(t, "base_fn", t.fn).__name__ for t in tuners}
    assert len(tuners) >= 6 and any("attn" in n for n in names) and any("lora" in n for n in names), names
    for t in tuners:
        assert hasattr(t, "early_config_prune") and isinstance(t.cache, dict) and hasattr(t, "_bench")
