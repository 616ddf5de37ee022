"""Data readers and the synthetic-shapes generator."""
import json
import os

import pytest
from PIL import Image

from ptpeft_fast.data import DataError, load_split, synthetic


def _img(path, color=(255, 0, 0)):
    Image.new("RGB", (8, 8), color).save(path)


def test_synthetic_deterministic_and_split_distinct():
    a = load_split({"format": "synthetic-shapes", "task": "vqa", "synthetic": {"seed": 3}}, "train", 12)
    b = load_split({"format": "synthetic-shapes", "task": "vqa", "synthetic": {"seed": 3}}, "train", 12)
    c = load_split({"format": "synthetic-shapes", "task": "vqa", "synthetic": {"seed": 4}}, "train", 12)
    assert [r.targets for r in a.records] == [r.targets for r in b.records]
    assert list(a[5][1].getdata()) == list(b[5][1].getdata())
    assert [r.targets for r in a.records] != [r.targets for r in c.records]
    v = load_split({"format": "synthetic-shapes", "task": "vqa", "synthetic": {"seed": 3}}, "val", 12)
    assert [r.meta["attrs"] for r in v.records] != [r.meta["attrs"] for r in a.records]
    rec = a.records[2]
    assert rec.question == synthetic.QUESTIONS["count"] and rec.targets[0] in {"1", "2", "3"} and len(rec.targets) == 10
    caps = load_split({"format": "synthetic-shapes", "task": "caption"}, "test", 3)
    assert len(caps) == 3 and len(caps.records[0].targets) == len(synthetic.CAPTION_TEMPLATES)
    words = set(synthetic.vocabulary())
    for r in caps.records:
        assert all(w in words for t in r.targets for w in t.split())


def test_coco_reader(tmp_path):
    os.makedirs(tmp_path / "img")
    _img(tmp_path / "img" / "a.jpg")
    _img(tmp_path / "img" / "b.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"image_id": 1, "caption": "a red square"}, {"image_id": 1, "caption": "red box"},
                           {"image_id": 2, "caption": "a thing"}]}
    (tmp_path / "cap.json").write_text(json.dumps(ann))
    cfg = {"format": "coco", "task": "caption",
           "train": {"annotations": str(tmp_path / "cap.json"), "images": str(tmp_path / "img")}}
    ds = load_split(cfg, "train")
    assert len(ds) == 2 and ds.records[0].targets == ["a red square", "red box"]
    assert ds[0][1].size == (8, 8)
    ann["annotations"].append({"image_id": 9, "caption": "x"})
    (tmp_path / "cap.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"cap\.json.*annotations\[3\].*image_id 9"):
        load_split(cfg, "train")


def test_vqav2_reader_and_missing_answers(tmp_path):
    os.makedirs(tmp_path / "img")
    _img(tmp_path / "img" / "COCO_val2014_000000000042.jpg")
    q = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "what color?", "question_id": 7}]}
    a = {"annotations": [{"question_id": 7, "image_id": 42, "answers": [{"answer": "red"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    cfg = {"format": "vqav2", "task": "vqa", "val": {"questions": str(tmp_path / "q.json"),
                                                       "annotations": str(tmp_path / "a.json"),
                                                       "images": str(tmp_path / "img")}}
    ds = load_split(cfg, "val")
    assert ds.records[0].question == "what color?" and ds.records[0].targets == ["red"] * 10
    a["annotations"][0]["answers"] = []
    (tmp_path / "a.json").write_text(json.dumps(a))
    with pytest.raises(DataError, match=r"a\.json: question 7 .* has no answers"):
        load_split(cfg, "val")


def test_jsonl_reader_errors_and_skip_bad_images(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [{"image": "ok.png", "question": "q?", "answers": ["yes"]},
             {"image": "bad.png", "question": "q2?", "answers": ["no"]},
             {"image": "missing.png", "question": "q3?", "answers": ["no"]}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = {"format": "jsonl", "task": "vqa", "train": {"path": str(p)}}
    with pytest.raises(DataError, match=r"d\.jsonl: record '2'.*bad\.png.*unreadable"):
        load_split(cfg, "train")
    ds = load_split({**cfg, "skip_bad_images": True}, "train")
    assert len(ds) == 1 and ds.skipped_images == 2
    p.write_text(json.dumps({"image": "ok.png", "question": "q?", "answers": []}))
    with pytest.raises(DataError, match=r"d\.jsonl: line 1 \(record 1\): no answers"):
        load_split(cfg, "train")
    p.write_text("{not json")
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: not valid JSON"):
        load_split(cfg, "train")
    with pytest.raises(DataError, match=r"data\.train\.path: file not found"):
        load_split({**cfg, "train": {"path": str(tmp_path / "nope.jsonl")}}, "train")
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_split(cfg, "train")


def test_hf_reader(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(DataError, match="needs the 'datasets' package"):
            load_split({"format": "hf", "task": "vqa", "train": {"path": str(tmp_path)}}, "train")
        return
    _img(tmp_path / "ok.png")
    d = datasets.Dataset.from_dict({"image": [str(tmp_path / "ok.png")], "question": ["q?"], "answers": [["a", "b"]]})
    d.save_to_disk(str(tmp_path / "ds"))
    ds = load_split({"format": "hf", "task": "vqa", "train": {"path": str(tmp_path / "ds")}}, "train")
    assert ds.records[0].targets == ["a", "b"]
