"""The ops of ptpeft_fast, each a ``torch.library`` op with one dispatch table (see :mod:`.dispatch`).

- :func:`prefix_attention`: attention over never-masked prefix keys plus the layer's keys.
- :func:`prefix_decode_step`: its one-query, no-grad CPU case without Python checks (``None``
  where the table would not choose ``decode_cpp``), the entry of the patched attention function.
- :func:`lora_linear`: ``x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ``.
- :func:`lora_branch`: ``base + scaling · (drop(x) Aᵀ) Bᵀ``, the LoRA term over a base product
  computed elsewhere (a bitsandbytes 4-bit or 8-bit layer's own forward).
- :func:`adapter`: ``x + up(act(down(x)))``.
- :func:`linear_cross_entropy`: the LM head and its cross-entropy without the ``[N, V]`` logits.
- :func:`singular_values`, :func:`spectrum_stats`: batched feature spectra.
- :func:`softcapped_attention`: Gemma 2's soft-capped logits over [prefix; keys] (plain ops).
- :func:`document_mask`: the dense mask of packed documents (``cu_seqlens``), what the
  reference runs for ``prefix_attention(..., cu_seqlens=...)``.

:func:`explain` says which implementation a call runs and why the others decline;
:func:`use_backend` forces one by name for a block of code (``"torch"``: the reference everywhere).
"""
from .adapter import adapter
from .attention_reference import softcapped_attention
from .availability import prepare
from .dispatch import BackendUnsupported, backend_for, backend_names, explain, forced_backend, use_backend
from .documents import document_mask
from .linear_cross_entropy import linear_cross_entropy
from .lora_branch import lora_branch
from .lora_linear import lora_linear
from .prefix_attention import prefix_attention, prefix_decode_step
from .spectrum import singular_values, spectrum_stats

__all__ = ["prefix_attention", "prefix_decode_step", "lora_linear", "lora_branch", "adapter", "linear_cross_entropy",
           "singular_values", "spectrum_stats",
           "softcapped_attention", "document_mask", "explain", "use_backend", "forced_backend", "backend_names",
           "backend_for",
           "prepare", "BackendUnsupported"]
