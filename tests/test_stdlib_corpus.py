"""The stdlib-docstrings corpus: deterministic, labelled, every family well populated."""
import hashlib
import subprocess
import sys

from ptpeft_fast.data.stdlib_docstrings import FAMILIES, build_corpus, label_names, limit_per_class

_CACHE = {}


def _corpus():
    if "c" not in _CACHE:
        _CACHE["c"] = build_corpus(seed=0)
    return _CACHE["c"]


def _digest(splits):
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        for e in splits[name]:
            h.update(f"{name}|{e.label}|{e.text}\n".encode())
    return h.hexdigest()


def test_every_family_has_enough_sentences_and_splits_are_disjoint():
    c = _corpus()
    assert len(label_names()) == len(FAMILIES) >= 4
    for family in FAMILIES:
        assert sum(e.family == family for e in c["train"]) >= 150, family
        assert sum(e.family == family for e in c["test"]) >= 25, family
        modules = {e.module for e in c["train"] if e.family == family}
        assert len(modules) >= 4, (family, modules)
    texts = [e.text for s in c.values() for e in s]
    assert len(texts) == len(set(texts))  # deduplicated, no sentence in two splits
    assert all(e.label == label_names().index(e.family) for s in c.values() for e in s)


def test_deterministic_across_processes():
    code = ("import hashlib;from ptpeft_fast.data.stdlib_docstrings import build_corpus as b;"
            "c=b(seed=0);h=hashlib.sha256()\n"
            "for n in ('train','val','test'):\n  [h.update(f'{n}|{e.label}|{e.text}\\n'.encode()) for e in c[n]]\n"
            "print(h.hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert other == _digest(_corpus())


def test_seed_changes_split_and_limit_per_class_is_deterministic():
    a = _corpus()
    b = build_corpus(seed=1, families={"numbers": FAMILIES["numbers"], "files": FAMILIES["files"]})
    a_train = {e.text for e in a["train"] if e.family in ("numbers", "files")}
    b_train = {e.text for e in b["train"]}
    assert a_train != b_train and len(a_train & b_train) > 0
    sub = limit_per_class(a["train"], 25, seed=3)
    assert sub == limit_per_class(a["train"], 25, seed=3)
    assert all(sum(e.label == k for e in sub) == 25 for k in range(len(FAMILIES)))
