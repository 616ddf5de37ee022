"""Prefix key/value producers, one per patched attention layer.

Variants (design §1):
- ``mlp``: E_l ∈ R^{P×d} → Linear(d,h) → tanh → Linear(h, 2·Hkv·D), split into K and V
  (seed 2's deep-share: K and V come from one embedding, so they share structure).
- ``mlp-global``: one embedding and one MLP for all layers of a component, the last
  Linear producing every layer's K and V; each layer computes only its own slice.
- ``none`` / static: K and V are parameters ``[Hkv, P, D]``. ``merge`` turns any variant
  into this form.
"""
from __future__ import annotations

import torch
from torch import nn


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    # Trainable parameters stay in fp32 (or fp64 for gradchecks) even in half-precision models.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class GlobalPrefixMLP(nn.Module):
    """One embedding and MLP that produce the prefixes of every layer of a component."""

    def __init__(self, num_layers: int, num_tokens: int, kv_heads: int, head_dim: int, embed_dim: int,
                 hidden: int, dropout: float, init_std: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        dtype = _param_dtype(dtype)
        self.num_layers, self.num_tokens, self.kv_heads, self.head_dim = num_layers, num_tokens, kv_heads, head_dim
        self.embedding = nn.Parameter(torch.randn(num_tokens, embed_dim, dtype=dtype, device=device) * init_std)
        self.mlp_in = nn.Linear(embed_dim, hidden, dtype=dtype, device=device)
        self.mlp_out = nn.Linear(hidden, num_layers * 2 * kv_heads * head_dim, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout)

    def layer_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[Hkv, P, D]`` of layer ``index`` (only that slice of the last Linear runs)."""
        width = 2 * self.kv_heads * self.head_dim
        h = torch.tanh(self.mlp_in(self.embedding))
        rows = slice(index * width, (index + 1) * width)
        out = self.dropout(nn.functional.linear(h, self.mlp_out.weight[rows], self.mlp_out.bias[rows]))
        return _split_kv(out, self.kv_heads, self.head_dim)


def _split_kv(out: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # out [P, 2·Hkv·D] → K, V [Hkv, P, D]
    p = out.shape[0]
    kv = out.view(p, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    return kv[0], kv[1]


class LayerPrefix(nn.Module):
    """The prefix of one attention layer; ``kv(dtype)`` returns K, V ``[Hkv, P, D]``.

    Outside autograd (evaluation, ``generate``) the result is cached until a parameter
    changes, so a generate call computes the prefix once and decode steps reuse it.
    """

    def __init__(self, reparam: str, num_tokens: int, kv_heads: int, head_dim: int, embed_dim: int,
                 hidden: int, dropout: float, init_std: float, dtype: torch.dtype, device=None,
                 shared: GlobalPrefixMLP | None = None, index: int = 0) -> None:
        super().__init__()
        dtype = _param_dtype(dtype)
        self.reparam, self.num_tokens, self.kv_heads, self.head_dim = reparam, num_tokens, kv_heads, head_dim
        self.index = index
        self._shared = [shared] if shared is not None else []  # a list: not registered twice
        if reparam == "mlp":
            self.embedding = nn.Parameter(torch.randn(num_tokens, embed_dim, dtype=dtype, device=device) * init_std)
            self.mlp_in = nn.Linear(embed_dim, hidden, dtype=dtype, device=device)
            self.mlp_out = nn.Linear(hidden, 2 * kv_heads * head_dim, dtype=dtype, device=device)
            self.dropout = nn.Dropout(dropout)
        elif reparam == "none":
            self.key = nn.Parameter(torch.randn(kv_heads, num_tokens, head_dim, dtype=dtype, device=device) * init_std)
            self.value = nn.Parameter(
                torch.randn(kv_heads, num_tokens, head_dim, dtype=dtype, device=device) * init_std)
        elif reparam == "mlp-global":
            if shared is None:
                raise ValueError("reparam='mlp-global' needs the shared GlobalPrefixMLP")
        else:
            raise ValueError(f"unknown reparam {reparam!r}")
        self._cache: tuple | None = None
        self.enabled = True  # False inside ptpeft_fast.disabled(model): the layer attends without a prefix

    def extra_repr(self) -> str:
        return f"reparam={self.reparam}, tokens={self.num_tokens}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reparam == "none":
            return self.key, self.value
        if self.reparam == "mlp":
            out = self.dropout(self.mlp_out(torch.tanh(self.mlp_in(self.embedding))))
            return _split_kv(out, self.kv_heads, self.head_dim)
        return self._shared[0].layer_kv(self.index)

    def _sources(self) -> tuple[torch.Tensor, ...]:
        # read by attribute on every call (not cached): FSDP and load(assign=True) swap the
        # Parameter objects; spelled out because Module.parameters() costs ~20 µs per decode step
        m = self._shared[0] if self.reparam == "mlp-global" else self
        if self.reparam == "none":
            return (self.key, self.value)
        return (m.embedding, m.mlp_in.weight, m.mlp_in.bias, m.mlp_out.weight, m.mlp_out.bias)

    def kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[Hkv, P, D]`` in ``dtype``."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._sources()):
            k, v = self._compute()
            return k.to(dtype), v.to(dtype)
        key = (dtype, self.training, tuple((id(p), p._version, p.device) for p in self._sources()))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                k, v = self._compute()
            self._cache = (key, k.to(dtype), v.to(dtype))
        return self._cache[1], self._cache[2]

    @torch.no_grad()
    def static_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[Hkv, P, D]`` as evaluation computes them (no dropout), detached; the
        module (and a shared MLP) keep their training mode."""
        modules = [self] + list(self._shared)
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            k, v = self._compute()
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)
        return k.detach(), v.detach()

    @torch.no_grad()
    def to_static(self) -> None:
        """Replace any reparameterisation by static K/V parameters (the MLP is dropped)."""
        if self.reparam == "none":
            return
        k, v = self.static_kv()
        dtype = _param_dtype(k.dtype)
        for name in ("embedding", "mlp_in", "mlp_out", "dropout"):
            if hasattr(self, name):
                delattr(self, name)
        self._shared = []
        self.key = nn.Parameter(k.detach().clone().to(dtype))
        self.value = nn.Parameter(v.detach().clone().to(dtype))
        self.reparam = "none"
        self._cache = None
