"""``train.packing``: each micro-batch's sequences packed into rows without padding.

The task's own collator builds the padded micro-batch (the same tokens and labels a padded run
trains on); this strips each row's padding and packs the rows best-fit-decreasing into rows of
at most ``train.max_tokens`` tokens (null: one row per micro-batch). A packed row carries
``position_ids`` restarting at 0 per document and no attention mask — what transformers'
``DataCollatorWithFlattening`` gives — so a patched decoder runs it through the varlen
attention op (:mod:`ptpeft_fast.packing`). Each document's first label is -100: with the
causal shift, the token before it belongs to another document.

The loop divides the summed loss by the real target tokens of the whole step, counted the same
way for packed and padded batches, so a packed and a padded run of the same data take the same
optimisation steps up to float error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["best_fit_decreasing", "PackingCollator", "PACKABLE_KEYS", "batches_note"]

# what a packed row can carry: text only (images, token types and the like are refused)
PACKABLE_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


def best_fit_decreasing(lengths: list[int], budget: Optional[int]) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total ``<= budget`` (None: one bin), longest
    first, each into the fullest bin it fits; a sequence longer than ``budget`` gets its own bin."""
    if budget is None:
        return [list(range(len(lengths)))] if lengths else []
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def batches_note(cfg: dict) -> str:
    """How the training batches were formed, for the report."""
    tc = cfg["train"]
    if not tc["packing"]:
        return "training batches: padded to each micro-batch's longest sequence (train.packing=false)"
    rows = "one row per micro-batch" if tc["max_tokens"] is None else f"rows of at most {tc['max_tokens']} tokens"
    return f"training batches: packed without padding (train.packing=true, {rows}; varlen prefix attention)"


class PackingCollator:
    """``items -> [row, ...]``: the padded micro-batch of ``collate``, repacked (see the module)."""

    def __init__(self, collate: Callable[[list], dict], max_tokens: Optional[int]) -> None:
        self.collate = collate
        self.max_tokens = max_tokens

    def __call__(self, items: list) -> list[dict]:
        batch = self.collate(items)
        extra = sorted(set(batch) - PACKABLE_KEYS - {"record_ids"})
        if extra:
            raise ValueError(f"train.packing: the batches carry {extra}, which a packed row cannot (text only: "
                             f"{sorted(PACKABLE_KEYS)}); set train.packing=false")
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        docs = [(ids[r][mask[r]], labels[r][mask[r]]) for r in range(ids.shape[0])]
        rows = []
        for members in best_fit_decreasing([len(d[0]) for d in docs], self.max_tokens):
            parts = [docs[i] for i in members if len(docs[i][0])]
            doc_labels = [lab.clone() for _, lab in parts]
            for lab in doc_labels:
                lab[0] = -100  # predicted from another document's last token: never a target
            rows.append({
                "input_ids": torch.cat([d for d, _ in parts])[None],
                "labels": torch.cat(doc_labels)[None],
                "position_ids": torch.cat([torch.arange(len(d)) for d, _ in parts])[None],
            })
        return rows
