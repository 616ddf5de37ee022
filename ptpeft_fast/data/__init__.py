"""Datasets for PT-PEFT training: built-in ``synthetic-shapes`` (and its text-only variant
``synthetic-text``) and readers for COCO captions, VQAv2, JSONL and HF ``datasets`` directories.

:func:`load_split` turns the ``data`` config section and a split name into a
:class:`RecordDataset`.
"""
from __future__ import annotations

from typing import Any

from . import stdlib_code_captions, synthetic
from .readers import read_coco_captions, read_hf_disk, read_jsonl, read_vqav2
from .records import DataError, Record, RecordDataset, check_images, open_image

FORMATS = ("synthetic-shapes", "synthetic-text", "stdlib-code-captions", "coco", "vqav2", "jsonl", "hf")

__all__ = ["DataError", "Record", "RecordDataset", "FORMATS", "load_split", "open_image",
           "synthetic", "read_coco_captions", "read_vqav2", "read_jsonl", "read_hf_disk"]


def _need(spec: dict, name: str, key: str) -> Any:
    if not spec.get(name):
        raise DataError(f"{key}.{name} is required for this data format")
    return spec[name]


def load_split(data_cfg: dict, split: str, max_samples: int | None = None) -> RecordDataset:
    """Build the dataset of one split from the ``data`` config section.

    ``data_cfg`` keys: ``format``, ``task`` (``caption``/``vqa``), ``skip_bad_images``, and
    per split (``train``/``val``/``test``) a mapping with the format's paths.  For
    ``synthetic-shapes`` the split mapping may give ``n``; ``data.synthetic`` gives
    ``seed`` and ``image_size``. ``stdlib-code-captions`` needs no paths (``data.split_seed``
    picks which modules are held out).  ``max_samples`` keeps the first N records.
    """
    fmt, task = data_cfg["format"], data_cfg["task"]
    key = f"data.{split}"
    spec = data_cfg.get(split) or {}
    if fmt == "synthetic-shapes":
        syn = data_cfg.get("synthetic") or {}
        recs = synthetic.make_records(task, split, spec.get("n"), int(syn.get("seed", 0)),
                                      int(syn.get("image_size", 32)))
    elif fmt == "synthetic-text":
        syn = data_cfg.get("synthetic") or {}
        recs = synthetic.make_text_records(task, split, spec.get("n"), int(syn.get("seed", 0)))
    elif fmt == "stdlib-code-captions":
        if task != "caption":
            raise DataError("data.format 'stdlib-code-captions' is a captioning format; set data.task=caption")
        recs = stdlib_code_captions.build_records(split, int(data_cfg.get("split_seed", 0)))
    else:
        if not spec:
            raise DataError(f"{key}: no paths given for split {split!r} (format {fmt!r})")
        if fmt == "coco":
            if task != "caption":
                raise DataError("data.format 'coco' is a captioning format; set data.task=caption")
            recs = read_coco_captions(_need(spec, "annotations", key), _need(spec, "images", key), key)
        elif fmt == "vqav2":
            if task != "vqa":
                raise DataError("data.format 'vqav2' is a VQA format; set data.task=vqa")
            recs = read_vqav2(_need(spec, "questions", key), _need(spec, "annotations", key),
                              _need(spec, "images", key),
                              spec.get("image_pattern", "COCO_{data_subtype}_{image_id:012d}.jpg"), key)
        elif fmt == "jsonl":
            recs = read_jsonl(_need(spec, "path", key), spec.get("images"), task, key)
        elif fmt == "hf":
            recs = read_hf_disk(_need(spec, "path", key), spec.get("split", split), task,
                                spec.get("columns"), key)
        else:
            raise DataError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if max_samples:
        recs = recs[: int(max_samples)]
    if not recs:
        raise DataError(f"{key}: split {split!r} is empty")
    with_image = [r.image is not None for r in recs]
    if any(with_image) and not all(with_image):
        a, b = (recs[with_image.index(True)], recs[with_image.index(False)])
        raise DataError(f"{key}: mixes records with an image ({a.source}: record {a.id!r}) and without "
                        f"({b.source}: record {b.id!r}); a split is all image-text or all text-only")
    recs, bad = check_images(recs, bool(data_cfg.get("skip_bad_images")), key)
    ds = RecordDataset(recs, task, f"{fmt}/{split}")
    ds.skipped_images = bad
    return ds
