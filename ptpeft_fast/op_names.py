"""Names shared by the config and the ops: a data module, so that checking a config registers no op.

The ops' dispatch tables may only use the implementation names listed here (``Table`` refuses
others), so the config's list of backends cannot drift from what the ops offer.
"""
from __future__ import annotations

__all__ = ["ACTIVATIONS", "IMPLEMENTATIONS", "BACKENDS"]

#: Activations of the bottleneck adapter.
ACTIVATIONS = ("relu", "gelu", "silu")

#: Every implementation name an op's dispatch table may hold (``PTPeftConfig.backend`` values).
IMPLEMENTATIONS = ("block_cpp", "blocked_cpp", "chunked", "csrc", "decode_cpp", "fused", "lse_merge", "merged",
                   "merged_cpp", "separate", "torch", "triton", "xformers")

#: ``PTPeftConfig.backend``: ``"auto"`` (each op's table chooses) or one implementation name.
BACKENDS = ("auto", *IMPLEMENTATIONS)
