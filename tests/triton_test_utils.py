"""Helpers shared by the Triton kernel tests (interpreter on CPU tensors)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

# DESIGN §5: relative error ‖out − ref‖ / ‖ref‖ per dtype; NaN never passes.
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
