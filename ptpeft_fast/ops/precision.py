"""The accumulation dtype every op's torch and CPU paths compute in (one rule for all of them)."""
from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (half-precision inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
