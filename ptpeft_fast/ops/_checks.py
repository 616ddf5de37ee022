"""Input checks shared by the ops (their messages name the op, the tensor and the fix)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def check_dtype_device(op: str, ref_name: str, ref: torch.Tensor,
                       tensors: Iterable[tuple[str, Optional[torch.Tensor]]]) -> None:
    """Raise ``ValueError`` when a tensor's dtype or device differs from ``ref``'s (None entries are skipped)."""
    for name, t in tensors:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "move them to one device")
