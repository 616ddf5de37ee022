"""Readers for COCO captions, VQAv2, JSONL and HF ``datasets`` saved with ``save_to_disk``.

Each returns a list of :class:`Record`; malformed input raises :class:`DataError` naming
the file and the record.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .records import DataError, Record, require_file


def _load_json(path: str, key: str) -> Any:
    path = require_file(path, key)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _field(obj: dict, name: str, path: str, where: str) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        raise DataError(f"{path}: {where}: missing field {name!r}")
    return obj[name]


def read_coco_captions(annotations: str, images: str, key: str = "data") -> list[Record]:
    """COCO captions: ``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``."""
    data = _load_json(annotations, f"{key}.annotations")
    path = os.path.expanduser(annotations)
    img_dir = os.path.expanduser(images)
    if not os.path.isdir(img_dir):
        raise DataError(f"{key}.images: image folder not found: {img_dir}")
    imgs = _field(data, "images", path, "top level")
    anns = _field(data, "annotations", path, "top level")
    files: dict[Any, str] = {}
    for i, im in enumerate(imgs):
        files[_field(im, "id", path, f"images[{i}]")] = _field(im, "file_name", path, f"images[{i}]")
    caps: dict[Any, list[str]] = {}
    for i, a in enumerate(anns):
        iid = _field(a, "image_id", path, f"annotations[{i}]")
        cap = _field(a, "caption", path, f"annotations[{i}]")
        if iid not in files:
            raise DataError(f"{path}: annotations[{i}]: image_id {iid!r} is not in 'images'")
        if not isinstance(cap, str) or not cap.strip():
            raise DataError(f"{path}: annotations[{i}] (image {iid}): empty caption")
        caps.setdefault(iid, []).append(cap.strip())
    recs = [Record(str(iid), os.path.join(img_dir, files[iid]), "", c, str(iid), path)
            for iid, c in caps.items()]
    if not recs:
        raise DataError(f"{path}: no captions")
    return recs


def read_vqav2(questions: str, annotations: str | None, images: str,
               image_pattern: str = "COCO_{data_subtype}_{image_id:012d}.jpg",
               key: str = "data") -> list[Record]:
    """VQAv2: questions JSON + annotations JSON (answers) + COCO image folder.

    ``annotations`` may be ``None`` only for a prediction-only split; training and
    evaluation need answers and a question without them is an error.
    """
    qdata = _load_json(questions, f"{key}.questions")
    qpath = os.path.expanduser(questions)
    img_dir = os.path.expanduser(images)
    if not os.path.isdir(img_dir):
        raise DataError(f"{key}.images: image folder not found: {img_dir}")
    subtype = qdata.get("data_subtype", "") if isinstance(qdata, dict) else ""
    qs = _field(qdata, "questions", qpath, "top level")
    answers: dict[Any, list[str]] = {}
    if annotations:
        adata = _load_json(annotations, f"{key}.annotations")
        apath = os.path.expanduser(annotations)
        for i, a in enumerate(_field(adata, "annotations", apath, "top level")):
            qid = _field(a, "question_id", apath, f"annotations[{i}]")
            ans = _field(a, "answers", apath, f"annotations[{i}] (question {qid})")
            try:
                answers[qid] = [str(x["answer"]) for x in ans]
            except (TypeError, KeyError):
                raise DataError(f"{apath}: annotations[{i}] (question {qid}): answers must be "
                                "a list of {'answer': ...}") from None
    recs = []
    for i, q in enumerate(qs):
        qid = _field(q, "question_id", qpath, f"questions[{i}]")
        iid = _field(q, "image_id", qpath, f"questions[{i}]")
        text = _field(q, "question", qpath, f"questions[{i}]")
        ans = answers.get(qid, [])
        if annotations and not ans:
            raise DataError(f"{os.path.expanduser(annotations)}: question {qid} "
                            f"({qpath} questions[{i}]) has no answers")
        fname = image_pattern.format(data_subtype=subtype, image_id=int(iid))
        recs.append(Record(str(qid), os.path.join(img_dir, fname), str(text), ans, str(iid), qpath))
    if not recs:
        raise DataError(f"{qpath}: no questions")
    return recs


def read_jsonl(path: str, images: str | None = None, task: str = "vqa", key: str = "data") -> list[Record]:
    """JSONL, one object per line: ``image`` (path, relative to ``images`` or to the file's
    folder; leave it out in every line for text-only data), ``question``/``prompt`` (VQA),
    ``answers`` (VQA) or ``captions`` (captioning), optional ``id``."""
    path = require_file(path, f"{key}.path")
    root = os.path.expanduser(images) if images else os.path.dirname(os.path.abspath(path))
    recs = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {ln}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {ln}: expected a JSON object")
            rid = str(obj.get("id", ln))
            img = obj.get("image")  # absent / null: a text-only record
            if img is not None and (not isinstance(img, str) or not img):
                raise DataError(f"{path}: line {ln} (record {rid}): 'image' must be a file path or absent")
            if task == "vqa":
                q = obj.get("question", obj.get("prompt"))
                if q is None:
                    raise DataError(f"{path}: line {ln}: missing field 'question' (or 'prompt')")
                tg = obj.get("answers", obj.get("answer"))
                if isinstance(tg, str):
                    tg = [tg]
                if not tg:
                    raise DataError(f"{path}: line {ln} (record {rid}): no answers")
            else:
                q = obj.get("prompt", "")
                tg = obj.get("captions", obj.get("caption"))
                if isinstance(tg, str):
                    tg = [tg]
                if not tg:
                    raise DataError(f"{path}: line {ln} (record {rid}): no captions")
            recs.append(Record(rid, os.path.join(root, img) if img is not None else None, str(q),
                               [str(t) for t in tg], str(obj.get("image_id", img or "")), path))
    if not recs:
        raise DataError(f"{path}: empty file")
    return recs


def read_hf_disk(path: str, split: str | None, task: str, columns: dict | None = None,
                 key: str = "data") -> list[Record]:
    """A ``datasets`` Dataset/DatasetDict saved with ``save_to_disk``.

    Column names default to ``image``, ``question``, ``answers`` (VQA) / ``captions``;
    ``columns`` renames them.  Images may be PIL images (an ``Image`` feature) or paths.
    """
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise DataError(f"{key}: format 'hf' needs the 'datasets' package "
                        "(pip install datasets)") from None
    from datasets import DatasetDict, load_from_disk

    p = require_file(path, f"{key}.path")
    ds = load_from_disk(p)
    if isinstance(ds, DatasetDict):
        if not split or split not in ds:
            raise DataError(f"{p}: split {split!r} not in saved DatasetDict ({sorted(ds)})")
        ds = ds[split]
    cols = {"image": "image", "question": "question", "answers": "answers",
            "captions": "captions", "id": "id", **(columns or {})}
    tcol = cols["answers"] if task == "vqa" else cols["captions"]
    for c in ("image", "question") if task == "vqa" else ("image",):
        if cols[c] not in ds.column_names:
            raise DataError(f"{p}: column {cols[c]!r} missing (has {ds.column_names})")
    if tcol not in ds.column_names:
        raise DataError(f"{p}: column {tcol!r} missing (has {ds.column_names})")
    recs = []
    for i in range(len(ds)):
        row = ds[i]
        rid = str(row.get(cols["id"], i))
        tg = row[tcol]
        if isinstance(tg, str):
            tg = [tg]
        if isinstance(tg, list) and tg and isinstance(tg[0], dict):
            tg = [t.get("answer", "") for t in tg]
        if not tg:
            raise DataError(f"{p}: record {rid} (row {i}): no {tcol}")
        img = row[cols["image"]]
        if not isinstance(img, str):
            img = (lambda im: (lambda: im))(img)  # PIL image already decoded by datasets
        q = row.get(cols["question"], "") if task == "vqa" else ""
        recs.append(Record(rid, img, str(q), [str(t) for t in tg], rid, p))
    if not recs:
        raise DataError(f"{p}: empty split")
    return recs
