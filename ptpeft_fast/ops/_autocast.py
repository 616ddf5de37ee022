"""Autocast for the fused ops: inside ``torch.autocast`` they run the way ``nn.Linear`` does there.

Autocast casts the operands of a matmul, not those of a custom autograd Function. Without this,
a LoRA or adapter layer inside ``torch.autocast`` received a bf16/fp16 ``x`` from the layer
before it and its fp32 weights, and refused the mix. The public ops therefore cast their floating
operands to the autocast dtype (float64 excepted, as autocast does) and run with autocast off.
The parameters keep their dtype, and their gradients flow back through the casts in it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def autocast_dtype(x: Any) -> Optional[torch.dtype]:
    """The autocast dtype of ``x``'s device when autocast is on there, else None."""
    if not isinstance(x, torch.Tensor):
        return None
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(device) if enabled else None


def cast_operands(dtype: torch.dtype, *values: Any) -> tuple:
    """``values`` with every floating tensor except float64 cast to ``dtype`` (others untouched)."""
    return tuple(v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
                 else v for v in values)


def in_autocast_dtype(op: F) -> F:
    """Decorate a public op whose first argument is its input: inside ``torch.autocast`` (on that
    input's device) it runs with autocast off on operands cast by :func:`cast_operands`, positional
    and keyword alike; outside, it is called unchanged."""

    @functools.wraps(op)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        dtype = autocast_dtype(args[0]) if args else None
        if dtype is None:
            return op(*args, **kwargs)
        with torch.autocast(args[0].device.type, enabled=False):
            names = list(kwargs)
            cast = cast_operands(dtype, *args, *(kwargs[n] for n in names))
            return op(*cast[:len(args)], **dict(zip(names, cast[len(args):], strict=True)))

    return wrapper  # type: ignore[return-value]
