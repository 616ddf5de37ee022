"""VQAv2 accuracy: the official answer normalisation and the soft, leave-one-out score.

Normalisation follows ``vqaEval.py`` of the VQA API (GT-Vision-Lab/VQA): punctuation
handling (``processPunctuation``), number words to digits, articles dropped and
contractions restored (``processDigitArticle``).

One deliberate difference: the official script normalises the prediction and the
answers only when the ten human answers disagree, so a prediction "Two" scores 0
against ten "2".  Here both sides are always normalised.  VQAv2's own answers are
already normalised, so scores differ only for such predictions.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as in vqaEval.py (the odd look-behind included)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The VQAv2 normalisation of one answer string."""
    a = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digit_article(_punctuation(a))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction: mean over the leave-one-out subsets of the human
    answers of ``min(#matching / 3, 1)``.

    With 10 answers this is the official VQAv2 score.  With fewer than 4 answers (JSONL
    data often has one) the threshold 3 cannot be met, so it becomes ``n - 1``; one answer
    means exact match after normalisation.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    n = len(gts)
    if n == 1:
        return float(pred == gts[0])
    need = min(3, n - 1)
    total = 0.0
    for i in range(n):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        total += min(1.0, matches / need)
    return total / n


def vqa_accuracy(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Mean soft accuracy (in percent, as VQAv2 reports it) over question ids."""
    missing = [k for k in references if k not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    scores = [vqa_score(predictions[k], references[k]) for k in references]
    return {"VQA-acc": 100.0 * sum(scores) / max(1, len(scores)), "n": len(scores)}
