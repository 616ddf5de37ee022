"""Nested training state (optimizer, scheduler, scaler, RNG) as safetensors + JSON: no pickle.

A pickle (what ``torch.save`` writes) can name any callable to run while it is read, and a run
folder is something users download and share. :func:`encode` splits a nested value into plain JSON and a
flat ``{key: tensor}`` dict (for safetensors); :func:`decode` puts it back. Supported: dicts (any
str/int/float/bool/None keys), lists, tuples, tensors, str, int, float, bool, None; anything else
is refused when saving, so a state that cannot be restored is never written.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["encode", "decode", "StateFormatError"]

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class StateFormatError(ValueError):
    """A state file does not hold what :func:`encode` writes."""


def encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``value`` as JSON-able data; its tensors go into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        key = path or "."
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        items = [[k, encode(v, tensors, f"{path}/{k}")] for k, v in value.items()]
        for k, _ in items:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"state key {k!r} at {path or '/'}: only str/int/float/bool/None keys can be saved")
        return {_DICT: items}
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    raise TypeError(f"state value at {path or '/'} is a {type(value).__name__}, which cannot be saved without pickle")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; :class:`StateFormatError` for anything it did not write."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if isinstance(data, dict):
        if set(data) == {_TENSOR}:
            key = data[_TENSOR]
            if key not in tensors:
                raise StateFormatError(f"tensor {key!r} is missing from the state's tensors")
            return tensors[key]
        if set(data) == {_TUPLE} and isinstance(data[_TUPLE], list):
            return tuple(decode(v, tensors) for v in data[_TUPLE])
        if set(data) == {_DICT} and isinstance(data[_DICT], list):
            out = {}
            for item in data[_DICT]:
                if not (isinstance(item, list) and len(item) == 2):
                    raise StateFormatError(f"malformed dict entry {item!r}")
                out[item[0]] = decode(item[1], tensors)
            return out
        raise StateFormatError(f"unexpected object with keys {sorted(data)[:5]}")
    if isinstance(data, (str, int, float, bool, type(None))):
        return data
    raise StateFormatError(f"unexpected {type(data).__name__}")
