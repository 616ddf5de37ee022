"""Two-stage training of a patched Llama built from a config, Triton kernels against the torch reference path.

Stage 1 trains the prefix, stage 2 LoRA with the prefix kept (``set_stage(model, "peft")``). One model,
one batch, one optimizer recipe; the weights are restored between the two runs, so the only difference
is ``ops.use_backend("triton")`` against ``ops.use_backend("torch")`` (the reference, never a peer).
Checks: every loss finite; each stage's loss falls; the first loss of each stage (the same weights in
both runs) within :data:`FIRST_LOSS_RTOL`, every later one within :data:`LOSS_RTOL` (the runs drift
apart by their rounding through the optimizer); each stage's first gradient of the trainable
parameters at cosine similarity >= :data:`GRAD_COSINE` to the reference's.

``llama-2048`` (8 layers, hidden 2048, 16 heads / 4 KV heads, L = 2048, bf16, P = 32, LoRA r = 16)
runs where the kernels compile for CUDA (tools/gpu_check.py); ``tiny`` runs the same code on CPU in
the Triton interpreter. With ``$PTPEFT_GPU_CHECK_OUT`` set, each size writes ``train-<size>.json``
(losses, gradient cosines, step times) there before the checks.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import ptpeft_fast as pf  # noqa: E402
from ptpeft_fast import ops  # noqa: E402

from triton_test_utils import (  # noqa: E402,F401
    DEVICE,
    count_triton_calls,
    fast_interpreter,
    gpu_only,
    needs_triton_device,
)

pytestmark = needs_triton_device

FIRST_LOSS_RTOL = 1e-2  # same weights, bf16 kernels against the bf16 reference: rounding only
LOSS_RTOL = 5e-2  # after optimizer steps on slightly different gradients
GRAD_COSINE = 0.99

SIZES = {
    "tiny": dict(hidden=64, inter=96, layers=1, heads=4, kv=2, vocab=97, L=16, batch=2, P=4, r=4, steps=2,
                 token_pool=12),
    "llama-2048": dict(hidden=2048, inter=5632, layers=8, heads=16, kv=4, vocab=32000, L=2048, batch=1, P=32, r=16,
                       steps=4, token_pool=256),
}
LR = {"prefix": 1e-2, "peft": 2e-3}


def _model(s: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                      max_position_embeddings=max(128, s["L"]))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    # no dropout anywhere: the two runs must compute the same function
    pf.patch(model, {"prefix": {"num_tokens": s["P"], "hidden_size": 256}, "lora": {"r": s["r"], "dropout": 0.0}})
    return model


def _batch(s: dict, device: str) -> torch.Tensor:
    """Tokens from a small pool of ids: a low-entropy batch whose loss any trainable part can lower fast."""
    g = torch.Generator().manual_seed(1)
    pool = torch.randperm(s["vocab"], generator=g)[: s["token_pool"]]
    return pool[torch.randint(0, len(pool), (s["batch"], s["L"]), generator=g)].to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train(model, ids, backend: str, steps: int) -> dict:
    """Both stages under ``ops.use_backend(backend)``: losses, first gradients, step times."""
    out = {"losses": {}, "grads": {}, "step_ms": []}
    with ops.use_backend(backend):
        for stage in ("prefix", "peft"):
            pf.set_stage(model, stage)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.0)
            losses = out["losses"][stage] = []
            for step in range(steps):
                _sync(ids.device.type)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if step == 0:
                    out["grads"][stage] = torch.cat([p.grad.detach().double().flatten() for p in params])
                opt.step()
                losses.append(float(loss.detach()))
                _sync(ids.device.type)
                if step > 0:  # the first step compiles (Triton) and warms up
                    out["step_ms"].append(1000 * (time.perf_counter() - t0))
    return out


@pytest.mark.parametrize("size", [pytest.param("tiny"), pytest.param("llama-2048", marks=gpu_only)])
def test_two_stage_training_triton_against_torch(size, monkeypatch):
    s = SIZES[size]
    dtype = torch.bfloat16
    model = _model(s, DEVICE, dtype)
    ids = _batch(s, DEVICE)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counts = count_triton_calls(monkeypatch, ("prefix_attention", "lora_linear"))
    ref = _train(model, ids, "torch", s["steps"])
    assert counts == {"prefix_attention": 0, "lora_linear": 0}, counts  # the reference ran no kernel
    model.load_state_dict(start)
    got = _train(model, ids, "triton", s["steps"])
    cosine = {st: float(torch.nn.functional.cosine_similarity(got["grads"][st], ref["grads"][st], dim=0))
              for st in got["grads"]}
    report = {
        "size": size, "config": {k: v for k, v in s.items()}, "dtype": str(dtype), "device": DEVICE,
        "losses_triton": got["losses"], "losses_torch": ref["losses"], "grad_cosine": cosine,
        "triton_calls": dict(counts),
        "step_ms_triton": sorted(got["step_ms"])[len(got["step_ms"]) // 2] if got["step_ms"] else None,
        "step_ms_torch": sorted(ref["step_ms"])[len(ref["step_ms"]) // 2] if ref["step_ms"] else None,
        "tolerances": {"first_loss_rtol": FIRST_LOSS_RTOL, "loss_rtol": LOSS_RTOL, "grad_cosine_min": GRAD_COSINE},
    }
    if os.environ.get("PTPEFT_GPU_CHECK_OUT"):
        path = Path(os.environ["PTPEFT_GPU_CHECK_OUT"]) / f"train-{size}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
    assert counts["prefix_attention"] > 0 and counts["lora_linear"] > 0, counts
    for stage in ("prefix", "peft"):
        lt, lr_ = got["losses"][stage], ref["losses"][stage]
        assert all(math.isfinite(x) for x in lt + lr_), (stage, lt, lr_)
        assert lt[-1] < lt[0] and lr_[-1] < lr_[0], f"{stage}: loss did not fall: triton {lt}, torch {lr_}"
        assert abs(lt[0] - lr_[0]) <= FIRST_LOSS_RTOL * abs(lr_[0]), (stage, lt[0], lr_[0])
        for a, b in zip(lt, lr_, strict=True):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (stage, lt, lr_)
        assert cosine[stage] >= GRAD_COSINE, (stage, cosine[stage])
