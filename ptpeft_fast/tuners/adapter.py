"""Bottleneck adapters, hooked onto existing modules (no model source is copied).

Sequential styles (Pfeiffer: after the feed-forward block; Houlsby: after attention
and after the feed-forward block) replace a module's output y by y + up(act(down(y)));
the parallel style adds up(act(down(x))) of the feed-forward block's input x to its output.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class BottleneckAdapter(nn.Module):
    """down ``[b, d]`` → activation → up ``[d, b]``; ``up`` starts at zero (identity at init)."""

    def __init__(self, dim: int, bottleneck: int, activation: str, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.activation = activation
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.backend = "auto"
        self._stash: torch.Tensor | None = None
        self.enabled = True  # False inside ptpeft_fast.disabled(model): the hooks pass outputs through

    def forward(self, x: torch.Tensor, residual: bool = True) -> torch.Tensor:
        dt = x.dtype
        return ops.adapter(x, self.down.weight.to(dt), self.down.bias.to(dt), self.up.weight.to(dt),
                           self.up.bias.to(dt), activation=self.activation, residual=residual, backend=self.backend)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value


def hook_sequential(target: nn.Module, adapter: BottleneckAdapter) -> list:
    """y ← y + adapter(y) on ``target``'s output."""
    def hook(_module, _args, out):
        if not adapter.enabled:
            return None
        return _replace_first(out, adapter(_first(out), residual=True))
    return [target.register_forward_hook(hook)]


def hook_parallel(ffn_in: nn.Module, ffn_out: nn.Module, adapter: BottleneckAdapter) -> list:
    """y ← y + adapter_without_residual(x), x the input of ``ffn_in``, y the output of ``ffn_out``."""
    def pre(_module, args, kwargs):
        adapter._stash = args[0] if args else next(iter(kwargs.values()))

    def post(_module, _args, out):
        x, adapter._stash = adapter._stash, None
        if not adapter.enabled:
            return None
        if x is None:
            raise RuntimeError("parallel adapter: the feed-forward input was not seen before its output")
        return _replace_first(out, _first(out) + adapter(x, residual=False))
    return [ffn_in.register_forward_pre_hook(pre, with_kwargs=True), ffn_out.register_forward_hook(post)]
