"""Helpers shared by the Triton kernel tests: CPU tensors in the interpreter, or CUDA tensors with the
kernels compiled when the interpreter is off on a CUDA machine (``TRITON_INTERPRET=0``, what
tools/gpu_check.py runs)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch


def _triton_device() -> "str | None":
    """Where the Triton kernels run in this process: ``cpu`` (interpreter), ``cuda`` (compiled), or None."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


#: the device the kernel tests put their tensors on (inputs are drawn on CPU, then moved: same values on both)
DEVICE = _triton_device() or "cpu"
#: compiled kernels on a GPU (not the interpreter)
ON_GPU = DEVICE == "cuda"
#: tests too large for the interpreter: they run when the kernels compile for CUDA
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled Triton on CUDA only (TRITON_INTERPRET=0 on a CUDA "
                              "machine: tools/gpu_check.py); too slow for the CPU interpreter")
needs_triton_device = pytest.mark.skipif(_triton_device() is None,
                                         reason="TRITON_INTERPRET=0 without CUDA: Triton has no device to run on")


def dev(t):
    """A tensor or module on :data:`DEVICE` (a no-op on CPU)."""
    return t.to(DEVICE)


# design §5: relative error ‖out − ref‖ / ‖ref‖ per dtype; NaN never passes.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against a float64 ``ref`` (inf if ``a`` has NaN)."""
    a = a.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else num


@pytest.fixture(autouse=True, scope="session")
def fast_interpreter():
    """Turn off the interpreter's per-op int32 overflow checks while these tests run.

    They roughly double the interpreter's cost and cannot fire at these tiny shapes (the
    kernels' offsets are far below 2**31). Triton internals: if the hook moves, run slow.
    """
    try:
        import triton.runtime.interpreter as interp

        builder = interp.interpreter_builder
        old = builder.options
        builder.options = dataclasses.replace(old, sanitize_overflow=False)
    except Exception:  # pragma: no cover - depends on Triton internals
        yield
        return
    yield
    builder.options = old


# The Triton implementations through the ops the library runs: the public ops with backend="triton",
# or, where a test fixes the kernel's dropout seed, the torch.library op itself with that seed.
def triton_prefix_attention(q, k, v, prefix_k, prefix_v, *, causal, attn_mask=None, scale=None, dropout_p=0.0,
                            seed=None):
    from ptpeft_fast import ops

    if seed is None:
        return ops.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, attn_mask=attn_mask, scale=scale,
                                    dropout_p=dropout_p, backend="triton")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.ptpeft_fast.prefix_attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, None,
                                                          torch.tensor([seed]), causal, scale, dropout_p, "triton")[0]


def triton_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, *, seed=None):
    from ptpeft_fast import ops

    if seed is None or dropout_p == 0:
        return ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend="triton")
    return torch.ops.ptpeft_fast.lora_linear_forward(x, weight, bias, lora_a, lora_b, None, torch.tensor([seed]),
                                                     scaling, dropout_p, "triton")[0]


def triton_adapter(x, down_weight, down_bias, up_weight, up_bias, activation="relu", residual=True):
    from ptpeft_fast import ops

    return ops.adapter(x, down_weight, down_bias, up_weight, up_bias, activation=activation, residual=residual,
                       backend="triton")


def count_triton_calls(monkeypatch, names=("prefix_attention", "lora_linear", "adapter")) -> dict:
    """Count the launches of each Triton implementation in ``names`` (``triton_ops.<name>_forward``)
    for the rest of the test: a patched model that silently fell back to torch would show zeros."""
    from ptpeft_fast.ops import triton_ops

    counts = dict.fromkeys(names, 0)
    for name in counts:
        real = getattr(triton_ops, name + "_forward")

        def spy(*a, __real=real, __name=name, **k):
            counts[__name] += 1
            return __real(*a, **k)

        monkeypatch.setattr(triton_ops, name + "_forward", spy)
    return counts
