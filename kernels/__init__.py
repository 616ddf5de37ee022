"""Triton kernels of ptpeft_fast (shipped as ``ptpeft_fast.kernels``).

Import the launchers from the submodules; the autograd wrappers that the public ops call
live in :mod:`ptpeft_fast.ops.triton_ops`.

- :mod:`.prefix_attention`: FlashAttention-2-style attention over [prefix ; real keys].
- :mod:`.lora`: fused LoRA linear (forward, dX, dA/dB).
- :mod:`.adapter`: fused bottleneck adapter (forward, backward).
"""
