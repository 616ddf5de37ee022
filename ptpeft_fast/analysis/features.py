"""Feature extraction through forward hooks (the representation whose spectrum is measured)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["FeatureBatch", "find_layers", "extract_features"]

# Name fragments that mark a component's stack of layers. The lead's architecture table is
# the authority for placement; this heuristic only has to find the block stack to hook.
_MARKERS: dict[str, tuple[str, ...]] = {
    "vision": ("vision", "visual", "image", "vit"),
    "qformer": ("qformer",),
    "encoder": ("encoder",),
    "decoder": ("decoder",),
    "cross": ("decoder",),
}
_NOT_LANGUAGE = ("vision", "visual", "image", "qformer", "vit", "audio")


class FeatureBatch(NamedTuple):
    """Hooked features ``[B, L, d]`` (float32, detached) and valid rows per sample (or None)."""

    features: torch.Tensor
    lengths: torch.Tensor | None


def _layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    stacks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and any(True for _ in mod[0].parameters()):
                stacks.append((name, mod))
    return stacks


def find_layers(model: nn.Module, component: str = "language") -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks of ``component``: ``"language"``, ``"vision"``,
    ``"qformer"``, ``"encoder"``, ``"decoder"``, or a dotted module path (``"model.layers"``).

    Raises ``ValueError`` naming the candidates when none (or no unique one) matches.
    """
    if "." in component or component not in {"language", *_MARKERS}:
        try:
            mod = model.get_submodule(component)
        except AttributeError as exc:
            raise ValueError(f"component {component!r}: no such submodule ({exc})") from None
        if not isinstance(mod, nn.ModuleList):
            raise ValueError(f"component {component!r} is a {type(mod).__name__}, not an nn.ModuleList of layers")
        return component, mod
    stacks = _layer_stacks(model)
    lower = [(n, m, n.lower()) for n, m in stacks]
    if component == "language":
        cands = [(n, m) for n, m, low in lower if not any(k in low for k in _NOT_LANGUAGE)]
        if any("encoder" in low for _, _, low in lower) and any("decoder" in low for _, _, low in lower):
            cands = [(n, m) for n, m in cands if "decoder" in n.lower()]  # encoder-decoder LM: its decoder
    else:
        cands = [(n, m) for n, m, low in lower if any(k in low for k in _MARKERS[component])]
        if component == "encoder":
            cands = [(n, m) for n, m in cands if not any(k in n.lower() for k in _NOT_LANGUAGE)]
    if not cands:
        raise ValueError(
            f"component {component!r}: no layer stack found; candidates are {[n for n, _ in stacks]} "
            "(pass one of them as component=)"
        )
    # The deepest stack (most blocks, then most parameters) is the component's main trunk.
    return max(cands, key=lambda nm: (len(nm[1]), sum(p.numel() for p in nm[1].parameters())))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _pack(feats: torch.Tensor, mask: torch.Tensor | None) -> FeatureBatch:
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != tuple(feats.shape[:2]):
        return FeatureBatch(feats, None)
    valid = mask.to(feats.device) != 0
    # Singular values do not depend on row order: move the valid tokens to the front (stable),
    # so left and right padding both become a plain per-sample length.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    packed = torch.gather(feats, 1, order[:, :, None].expand_as(feats))
    lengths = valid.sum(1).clamp(min=1).cpu()
    return FeatureBatch(packed, lengths)


def extract_features(
    model: nn.Module,
    dataloader: Iterable,
    component: str = "language",
    layer: int = -1,
    *,
    max_batches: int | None = None,
) -> Iterator[FeatureBatch]:
    """Yield the output features of one layer for every batch of ``dataloader``.

    Args:
        model: a Hugging Face model (patched or not); it is run in eval mode under ``no_grad``.
        dataloader: yields dicts of model inputs (``input_ids``, ``attention_mask``,
            ``pixel_values``...), tuples of positional inputs, or ``input_ids`` tensors.
        component: which layer stack (see :func:`find_layers`).
        layer: index into that stack (``-1``: the last layer, the paper's choice).
        max_batches: stop after this many batches.

    Yields:
        :class:`FeatureBatch` with ``[B, L, d]`` float32 features on the model's device; when the
        batch has an ``attention_mask`` matching the features, padding is moved to the end and
        ``lengths`` holds the number of real tokens.
    """
    _, stack = find_layers(model, component)
    if not -len(stack) <= layer < len(stack):
        raise ValueError(f"layer={layer} is out of range for {len(stack)} layers of component {component!r}")
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(out.detach())

    handle = stack[layer].register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to_device(batch, device)
            captured.clear()
            with torch.no_grad():
                if isinstance(batch, Mapping):
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    model(**inputs)
                    mask = inputs.get("attention_mask")
                elif isinstance(batch, (list, tuple)):
                    model(*batch)
                    mask = None
                else:
                    model(input_ids=batch)
                    mask = None
            if not captured:
                raise RuntimeError(f"layer {layer} of component {component!r} did not run in the forward pass")
            feats = captured[-1]
            if feats.dim() == 2:
                feats = feats[None]
            yield _pack(feats.float(), mask)
    finally:
        handle.remove()
        model.train(was_training)
