"""Autograd ops of ptpeft_fast; the only place that chooses a backend (see ``_backend``).

- :func:`prefix_attention`: attention over never-masked prefix keys plus the layer's keys.
- :func:`prefix_decode_step`: its one-query, no-grad CPU case without Python checks (``None``
  where it does not apply), the entry of the patched attention function.
- :func:`lora_linear`: ``x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ``.
- :func:`adapter`: ``x + up(act(down(x)))``.
- :func:`singular_values`, :func:`spectrum_stats`: batched feature spectra (``csrc/`` extension).
"""
from ._backend import BACKENDS, resolve_backend, use_backend
from .adapter import adapter
from .lora_linear import lora_linear
from .prefix_attention import prefix_attention, prefix_decode_step
from .spectrum import singular_values, spectrum_stats

__all__ = ["prefix_attention", "prefix_decode_step", "lora_linear", "adapter", "singular_values", "spectrum_stats", "use_backend",
           "resolve_backend", "BACKENDS"]
