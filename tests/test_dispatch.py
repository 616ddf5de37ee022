"""The dispatch tables: what ``auto`` picks on CPU and CUDA, named backends, Triton on CPU only in
its interpreter, and (when present) CUDA against the float64 torch reference."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ptpeft_fast import ops
from ptpeft_fast.ops import availability

from triton_test_utils import TOL, rel_err

HAS_TRITON = availability.triton_ok()
# the modules (the package's attributes of these names are the public functions)
attention_mod = importlib.import_module("ptpeft_fast.ops.prefix_attention")
lora_mod = importlib.import_module("ptpeft_fast.ops.lora_linear")
adapter_mod = importlib.import_module("ptpeft_fast.ops.adapter")
CUDA = torch.cuda.is_available()


def _attn_inputs(device="cpu", dtype=torch.float32, B=2, H=4, Hkv=2, L=9, S=9, P=3, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, H, L, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(Hkv, P, D), mk(Hkv, P, D)


def _lora_inputs(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(5, 24), mk(16, 24), mk(16), mk(4, 24), mk(16, 4)


def _adapter_inputs(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(5, 24), mk(8, 24), mk(8), mk(24, 8), mk(24)


def _call(op, backend, inputs):
    if op == "prefix_attention":
        return ops.prefix_attention(*inputs, causal=True, backend=backend)
    if op == "lora_linear":
        return ops.lora_linear(*inputs, 2.0, backend=backend)
    return ops.adapter(*inputs, activation="gelu", backend=backend)


INPUTS = {"prefix_attention": _attn_inputs, "lora_linear": _lora_inputs, "adapter": _adapter_inputs}


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """Subprocess with TRITON_INTERPRET unset: backend='triton' on CPU tensors must say how to fix it."""
    code = textwrap.dedent(
        """
        import torch
        from ptpeft_fast import ops
        x = torch.randn(3, 8)
        calls = {
            "prefix_attention": lambda: ops.prefix_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16),
                torch.randn(1, 2, 3, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16), causal=True, backend="triton"),
            "lora_linear": lambda: ops.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2),
                                                   1.0, backend="triton"),
            "adapter": lambda: ops.adapter(x, torch.randn(2, 8), None, torch.randn(8, 2), None, backend="triton"),
        }
        for name, fn in calls.items():
            try:
                fn()
            except ValueError as e:
                assert "TRITON_INTERPRET=1" in str(e) and "'torch'" in str(e), str(e)
                print("refused", name)
            else:
                raise SystemExit(name + " ran on CPU without the interpreter")
        # auto still works on CPU (torch path)
        ops.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
        print("auto ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("refused") == 3 and "auto ok" in res.stdout


FUNCS = {"prefix_attention": ops.prefix_attention, "lora_linear": ops.lora_linear, "adapter": ops.adapter}


def _explain(op, backend, inputs):
    if op == "prefix_attention":
        return ops.explain(FUNCS[op], *inputs, causal=True, backend=backend)
    if op == "lora_linear":
        return ops.explain(FUNCS[op], *inputs, 2.0, backend=backend)
    return ops.explain(FUNCS[op], *inputs, activation="gelu", backend=backend)


@pytest.mark.parametrize("op", list(INPUTS))
def test_auto_on_cpu_never_takes_triton_and_matches_the_reference(op):
    inputs = INPUTS[op]()
    e = _explain(op, "auto", inputs)
    assert e.chosen != "triton" and e.declined["triton"]
    out = _call(op, "auto", inputs)
    ref = _call(op, "torch", [t.detach().double() for t in inputs])
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("op", list(INPUTS))
def test_use_backend_triton_routes_to_triton_and_matches_torch(op):
    from ptpeft_fast.ops import triton_ops

    inputs = INPUTS[op]()
    with ops.use_backend("triton"), triton_ops.poison_outputs():
        assert _explain(op, "auto", inputs).chosen == "triton"
        out = _call(op, "auto", inputs)
        grads = torch.autograd.grad(out.sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = _call(op, "torch", ref_in)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    for a, b in zip((out,) + grads, (ref,) + ref_grads, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_auto_picks_triton_for_cuda_calls():
    """The tables' CUDA rows, from call records (no CUDA needed): Triton first when installed; without
    it the chunked attention (never the reference) and the separate LoRA branch in half precision."""
    attn = attention_mod.AttentionCall("cuda", torch.bfloat16, 2, 8, 2, 64, 64, 8, 128, True, "bool", False, False,
                                       True)
    lora = lora_mod.LoraCall("cuda", torch.bfloat16, 128, 8, False, True)
    adap = adapter_mod.AdapterCall("cuda", torch.bfloat16, 128, 64, 16, 64)
    if HAS_TRITON:
        assert attention_mod.TABLE.choose("auto", attn) == "triton"
        assert lora_mod.TABLE.choose("auto", lora) == "triton"
        assert adapter_mod.TABLE.choose("auto", adap) == "triton"
    fp64 = attn._replace(dtype=torch.float64)  # what Triton refuses goes to chunked, not the reference
    assert attention_mod.TABLE.choose("auto", fp64) == "chunked"
    assert attention_mod.TABLE.choose("auto", attn._replace(D=320)) == ("chunked")
    assert lora_mod.TABLE.choose("auto", lora._replace(r=300)) == "separate"
    assert attention_mod.TABLE.choose("auto", attn._replace(device="cpu", dtype=torch.float32)) == "block_cpp"


def test_xformers_refused_on_cpu_and_for_other_ops():
    with pytest.raises(ValueError, match="CUDA"):
        _call("prefix_attention", "xformers", _attn_inputs())
    with pytest.raises(ValueError, match="not one of"):
        _call("lora_linear", "xformers", _lora_inputs())
    from ptpeft_fast.ops import xformers_ops

    with pytest.raises(ValueError, match="CUDA"):
        xformers_ops.prefix_attention(*_attn_inputs(), causal=True)


# ------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", list(INPUTS))
def test_cuda_auto_is_triton_and_matches_torch(op, dtype):
    big = dict(B=2, H=8, Hkv=2, L=300, S=300, P=32, D=128) if op == "prefix_attention" else {}
    inputs = INPUTS[op]("cuda", dtype, **big)
    out = _call(op, "auto", inputs)
    grads = torch.autograd.grad(out.float().sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = _call(op, "torch", ref_in)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    for a, b in zip((out,) + grads, (ref,) + ref_grads, strict=True):
        assert rel_err(a, b) <= TOL[dtype]


@pytest.mark.skipif(not (CUDA and availability.xformers_ok()), reason="needs CUDA and xformers")
@pytest.mark.parametrize("case", ["causal", "full", "padded", "L_gt_S", "gqa_shared_batch"])
def test_cuda_xformers_matches_torch(case):
    kw = dict(B=2, H=4, Hkv=2, L=40, S=40, P=5, D=64)
    if case == "L_gt_S":
        kw.update(L=40, S=12)
    inputs = _attn_inputs("cuda", torch.float16, **kw)
    mask = None
    if case == "padded":
        j = torch.arange(kw["S"], device="cuda")
        mask = (j >= torch.tensor([0, 7], device="cuda")[:, None])[:, None, None, :] & (
            j[None, :] <= torch.arange(kw["L"], device="cuda")[:, None])
    causal = case != "full"
    out = ops.prefix_attention(*inputs, causal=causal, attn_mask=mask, backend="xformers")
    grads = torch.autograd.grad(out.float().sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = ops.prefix_attention(*ref_in, causal=causal, attn_mask=mask, backend="torch")
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    for a, b in zip((out,) + grads, (ref,) + ref_grads, strict=True):
        assert rel_err(a, b) <= TOL[torch.float16]
