"""Captioning metrics through ``pycocoevalcap``: CIDEr-D, BLEU-4, METEOR, ROUGE-L.

pycocoevalcap's ``Cider`` scorer is the CIDEr-D variant (clipped n-gram counts,
Gaussian length penalty, sigma 6) that the COCO server reports; its IDF comes from the
references of the evaluated set, so scores depend on the whole set, as on the server.

Tokenisation: with Java, pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP) and METEOR
1.5 run as usual.  Without ``java`` on PATH, :func:`simple_ptb_tokenize` is used
(lower-case, split off punctuation, drop the punctuation tokens PTBTokenizer drops;
it does not split clitics such as "n't", so BLEU/CIDEr can differ slightly from the
Java path) and METEOR is reported as ``None`` with ``meteor_unavailable`` set — never 0.
"""
from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

# the tokens pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS removes after tokenising
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                    ":", "-", "--", "...", ";", "(", ")", "{", "}", '"'}
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|\.\.\.|--|[^\sa-z0-9]")


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed by PTBTokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_ptb_tokenize(text: str) -> str:
    """Python stand-in for PTBTokenizer + punctuation removal: returns space-joined tokens."""
    toks = _TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in PTB_PUNCTUATIONS)


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    use_java: bool | None = None) -> dict:
    """Corpus captioning scores (pycocoevalcap scale, CIDEr-D ×1; we report ×100 for all).

    Returns ``{"CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L", "n", "tokenizer"}`` in percent, and
    ``per_record["CIDEr-D"]`` (record id -> its CIDEr-D; their mean is the corpus score);
    ``METEOR`` is ``None`` and ``meteor_unavailable`` is True when Java is missing or
    ``use_java=False``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(references)
    missing = [k for k in ids if k not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} image(s), e.g. {missing[0]!r}")
    if not ids:
        raise ValueError("caption_metrics: empty reference set")
    java = java_available() if use_java is None else (use_java and java_available())
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in references[k]] for k in ids})
        res = tok.tokenize({k: [{"caption": predictions[k]}] for k in ids})
    else:
        gts = {k: [simple_ptb_tokenize(c) for c in references[k]] for k in ids}
        res = {k: [simple_ptb_tokenize(predictions[k])] for k in ids}
    out: dict = {"n": len(ids), "tokenizer": "PTBTokenizer" if java else "simple_ptb_tokenize"}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["BLEU-4"] = 100.0 * float(bleu[3])
    out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    cider, per = Cider().compute_score(gts, res)
    out["CIDEr-D"] = 100.0 * float(cider)
    # CIDEr-D is the mean of per-record scores (document frequencies from all references): a
    # bootstrap over records resamples these
    out["per_record"] = {"CIDEr-D": {k: 100.0 * float(v) for k, v in zip(gts, per, strict=True)}}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        m = Meteor()
        try:
            out["METEOR"] = 100.0 * float(m.compute_score(gts, res)[0])
        finally:
            _close_meteor(m)
        out["meteor_unavailable"] = False
    else:
        out["METEOR"] = None
        out["meteor_unavailable"] = True
    return out


def _close_meteor(m) -> None:
    # the Meteor wrapper keeps a JVM alive until garbage collection; stop it now
    try:
        with m.lock:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
    except Exception:
        pass
