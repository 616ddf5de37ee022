"""The stdlib-code-captions corpus, the SmolLM2 preset's config (``--quick``) and the experiment
report of a generation task. No model is loaded here (tests/test_smollm2.py runs it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ptpeft_fast.data import DataError, load_split
from ptpeft_fast.data.stdlib_code_captions import build_records, first_sentence
from ptpeft_fast.train.config import ConfigError, load_config
from ptpeft_fast.train.experiment import write_experiment_report

PRESET = Path(__file__).resolve().parents[1] / "ptpeft_fast" / "configs" / "smollm2-code-captions.yaml"


@pytest.fixture(scope="module")
def splits():
    return {s: build_records(s) for s in ("train", "val", "test")}


def test_corpus_is_deterministic_split_by_module_and_well_formed(splits):
    assert [r.id for r in build_records("test")] == [r.id for r in splits["test"]]
    assert len(splits["train"]) > 500 and len(splits["val"]) > 100 and len(splits["test"]) > 200
    modules = {s: {r.meta["module"] for r in recs} for s, recs in splits.items()}
    assert not (modules["train"] & modules["test"]) and not (modules["train"] & modules["val"])
    assert len(modules["test"]) >= 10  # held-out modules, not a handful
    sentences = [r.targets[0] for recs in splits.values() for r in recs]
    assert len(sentences) == len(set(sentences))  # a sentence is kept once over the corpus
    for r in splits["test"]:
        assert r.image is None and r.question.startswith("def ") and r.question.endswith(":")
        assert r.id.startswith(r.meta["module"] + ".")
        (t,) = r.targets
        assert t[0].isupper() and t.endswith(".") and 4 <= len(t.split()) <= 30
    # a method's def line names its class
    assert any("." in r.question.split("(")[0] for r in splits["train"])
    # the first N records span many modules (hash order), so eval.max_samples samples them all
    assert len({r.meta["module"] for r in splits["test"][:64]}) >= 8


def test_first_sentence_rules():
    assert first_sentence("Join a base URL and a possibly relative URL.\n\nMore.") == \
        "Join a base URL and a possibly relative URL."
    assert first_sentence("Return the\nsum of a and b. Then more.") == "Return the sum of a and b."
    assert first_sentence("x = f(a, b) -> int") is None  # not a sentence
    assert first_sentence("Too short.") is None
    assert first_sentence("") is None


def test_format_is_captioning_only():
    with pytest.raises(DataError, match="captioning format"):
        load_split({"format": "stdlib-code-captions", "task": "vqa"}, "test")
    with pytest.raises(ConfigError, match="stdlib-code-captions"):
        load_config(None, ["data.format=stdlib-code-captions", "data.task=vqa"])
    ds = load_split({"format": "stdlib-code-captions", "task": "caption", "split_seed": 0}, "val", 5)
    assert len(ds) == 5 and not ds.has_images


def test_preset_and_its_quick_variant():
    full = load_config(str(PRESET))
    assert full["model"]["name"] == "smollm2-135m" and full["experiment"]["seeds"] == [0, 1, 2, 3, 4]
    assert full["experiment"]["methods"] == ["zero-shot", "prefix", "lora", "adapter", "pt-lora", "pt-adapter"]
    # the protocol: rates chosen on val with a seed of their own, the whole test split
    sweep = full["experiment"]["lr_sweep"]
    assert sweep["seed"] not in full["experiment"]["seeds"] and set(sweep["grid"]) == {
        "stage1", "lora", "adapter", "pt-lora", "pt-adapter"} and all(len(v) == 3 for v in sweep["grid"].values())
    assert full["eval"]["split"] == "test" and full["eval"]["max_samples"] is None and full["eval"]["val_every"]
    assert full["stage1"]["max_steps"] == full["stage2"]["max_steps"]  # PT-X's stage 2 = X's only stage
    quick = load_config(str(PRESET), ["stage2.max_steps=2"], quick=True)
    assert quick["experiment"]["seeds"] == [0] and quick["stage1"]["max_steps"] == 4
    assert not quick["experiment"]["lr_sweep"] and not quick["eval"]["val_every"]
    assert quick["stage2"]["max_steps"] == 2  # --set comes after the quick overrides
    assert quick["output"]["dir"].endswith("-quick")
    with pytest.raises(ConfigError, match="no 'quick' list"):
        load_config(None, quick=True)


def test_experiment_report_of_a_generation_task(tmp_path):
    curve = [0.5, 0.3, 0.2]

    def row(cider, er):
        # as a machine without Java records them: METEOR None
        return {"metrics": {"tokenizer": "simple_ptb_tokenize", "CIDEr-D": cider, "BLEU-4": 1.0, "METEOR": None,
                            "ROUGE-L": 20.0, "meteor_unavailable": True}, "n": 8, "seconds": 10.0,
                "trainable": 5, "n_train": 100,
                "spectrum": {"remaining_rank_ratio": 0.3, "effective_rank": er, "n_samples": 4, "curve": curve}}

    groups = [{"per_class": None, "variant": "", "method": "Zero-shot", "key": "zero-shot", "rows": [row(5.0, 9.0)]},
              {"per_class": None, "variant": "", "method": "PT-LoRA", "key": "pt-lora",
               "rows": [row(30.0, 8.0), row(34.0, 8.4)]}]
    base = load_config(str(PRESET), ["experiment.seeds=[0, 1]"])
    md, png = write_experiment_report(str(tmp_path), groups, base, "3.11", 60.0, title="T")
    text = Path(md).read_text()
    assert "| method | CIDEr-D | BLEU-4 | ROUGE-L |" in text  # METEOR None in every row: no column
    assert "| Zero-shot (1 seed) | 5.00 |" in text and "| PT-LoRA | 32.00 ± 2.83 |" in text
    assert "prompt token" in text and png is not None and Path(png).is_file()


def test_quick_with_resume_and_zero_shot_with_classification_are_refused(tmp_path, capsys):
    from ptpeft_fast.train import main
    (tmp_path / "config.yaml").write_text("model: {name: tiny-blip2}\n")
    assert main(["--resume", str(tmp_path), "--quick"]) == 2
    assert "--quick goes with --config" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'zero-shot' is for generation tasks"):
        load_config(None, ["data.format=stdlib-docstrings", "data.task=classification",
                           "experiment.methods=[zero-shot]"])
