"""Captioning metrics against pycocoevalcap, and VQAv2 accuracy."""
import shutil

import pytest

from ptpeft_fast.metrics import caption_metrics, normalize_answer, simple_ptb_tokenize, vqa_accuracy, vqa_score

PREDS = {"1": "a man riding a horse on the beach.", "2": "two dogs play in the grass", "3": "a red car"}
REFS = {"1": ["A man rides a horse on a beach.", "a person riding a horse near the sea"],
        "2": ["Two dogs playing on grass.", "dogs in a green field"],
        "3": ["a red car parked on the street", "a small red automobile"]}


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the dog", "dog"), ("isnt", "isn't"), ("yes.", "yes"), ("a  Red, car", "red car"),
    ("1,000", "1000"), ("3.5", "3.5"), ("none", "0"), ("black/white", "black white"), ("what's up?", "what's up"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_score_hand_computed():
    assert vqa_score("2", ["2"] * 10) == 1.0
    # 3 of 10 humans say "2": each leave-one-out subset has 3 matches (1.0) or 2 (2/3)
    assert vqa_score("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    assert vqa_score("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_score("cat", ["dog"] * 10) == 0.0
    assert vqa_score("The Dog", ["dog"]) == 1.0
    acc = vqa_accuracy({"a": "2", "b": "no"}, {"a": ["2"] * 10, "b": ["yes"] * 10})
    assert acc["VQA-acc"] == pytest.approx(50.0)
    with pytest.raises(KeyError):
        vqa_accuracy({}, {"a": ["x"]})


def test_caption_identical_is_perfect_and_python_tokenizer():
    refs = {"1": ["a red square on the left"], "2": ["two blue circles on the top"]}
    m = caption_metrics({"1": "a red square on the left", "2": "two blue circles on the top"}, refs, use_java=False)
    assert m["BLEU-4"] == pytest.approx(100.0, abs=1e-3) and m["ROUGE-L"] == pytest.approx(100.0)
    assert m["METEOR"] is None and m["meteor_unavailable"] is True  # never a silent 0
    assert simple_ptb_tokenize("A man, riding -- a horse.") == "a man riding a horse"


def test_caption_matches_pycocoevalcap_direct_python_tokenizer():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts = {k: [simple_ptb_tokenize(c) for c in v] for k, v in REFS.items()}
    res = {k: [simple_ptb_tokenize(PREDS[k])] for k in REFS}
    m = caption_metrics(PREDS, REFS, use_java=False)
    assert m["BLEU-4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert m["CIDEr-D"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert m["ROUGE-L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_caption_matches_pycocoevalcap_java():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    m = caption_metrics(PREDS, REFS)
    assert m["tokenizer"] == "PTBTokenizer" and m["meteor_unavailable"] is False
    assert m["CIDEr-D"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    # pycocoevalcap's Meteor().compute_score(gts, res) on this set (METEOR 1.5); a constant
    # because a second METEOR JVM (2 GB heap, paraphrase table) costs more than the test
    assert m["METEOR"] == pytest.approx(43.0879179, abs=1e-4)
