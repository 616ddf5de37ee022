"""``stdlib-docstrings``: a real-text classification corpus built from the Python standard library.

Sentences come from the docstrings of standard-library modules and their public members,
labelled by the family of the module they document (files, data formats, networking,
numbers, concurrency). Nothing is downloaded: the text ships with every Python. The corpus
is the same on every machine with the same Python minor version (docstrings change between
versions), so the version is recorded with it.

Building it:
1. for each module of each family (sorted), take the module docstring and the docstrings of
   its public classes, functions and methods (``inspect.getdoc``);
2. drop doctest and code lines, join wrapped lines, split into sentences;
3. keep sentences of ``min_words``..``max_words`` words made mostly of letters;
4. deduplicate: a sentence that occurs in two families is dropped from both (it carries no
   label), one that repeats within a family is kept once;
5. split train/val/test by a seeded hash of the sentence, so membership does not depend on
   the order of iteration or on which other sentences exist.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass

FAMILIES: dict[str, tuple[str, ...]] = {
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "io", "stat",
              "fileinput"),
    "data formats": ("json", "csv", "configparser", "plistlib", "xml.etree.ElementTree", "html.parser", "base64",
                     "binascii", "zipfile", "tarfile", "pickle", "struct", "tomllib", "gzip"),
    "networking": ("socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib",
                   "ftplib", "ipaddress", "socketserver", "poplib", "imaplib", "http.cookies", "email.message"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator"),
    "concurrency": ("threading", "multiprocessing.pool", "concurrent.futures", "queue", "sched", "asyncio.locks",
                    "asyncio.queues", "asyncio.tasks", "subprocess", "selectors"),
}
SPLITS = ("train", "val", "test")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")
_CODE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=*]{3,}|:[a-z]+:)")


@dataclass(frozen=True)
class Example:
    """One labelled sentence."""

    text: str
    label: int
    family: str
    module: str


def python_version() -> str:
    """The Python minor version the corpus was built with (it depends on it)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. ssl on a Python built without OpenSSL: skipped, and recorded
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__ or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and inspect.isroutine(member):
                    docs.append(inspect.getdoc(member) or "")
    return [d for d in docs if d]


def _sentences(doc: str, min_words: int, max_words: int) -> list[str]:
    paragraphs, current = [], []
    for line in doc.splitlines():
        if not line.strip() or _CODE.match(line) or line.startswith("    "):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    out = []
    for para in paragraphs:
        for s in _SENTENCE_END.split(para):
            s = " ".join(s.split())
            words = s.split()
            if not (min_words <= len(words) <= max_words) or not s[0].isupper() or not s.endswith("."):
                continue
            letters = sum(c.isalpha() or c == " " for c in s)
            if letters < 0.85 * len(s):  # mostly code or numbers
                continue
            out.append(s)
    return out


def split_of(key: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """``train``/``val``/``test`` for ``key`` by a seeded hash: membership depends on the key
    alone, not on iteration order or on the other keys (shared by the stdlib corpora)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


def build_corpus(seed: int = 0, min_words: int = 6, max_words: int = 40,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 families: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[Example]]:
    """Build the corpus and split it; returns ``{"train": [...], "val": [...], "test": [...]}``.

    Labels index the sorted family names (see :func:`label_names`).
    """
    families = families or FAMILIES
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    names = sorted(families)
    found: dict[str, dict[str, str]] = {}  # sentence -> {family: first module}
    for family in names:
        for module_name in families[family]:
            for doc in _docstrings(module_name):
                for s in _sentences(doc, min_words, max_words):
                    found.setdefault(s, {}).setdefault(family, module_name)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for text in sorted(found):
        fams = found[text]
        if len(fams) != 1:
            continue  # the same sentence documents two families: no label
        (family, module_name), = fams.items()
        splits[split_of(text, seed, fractions)].append(Example(text, names.index(family), family, module_name))
    return splits


def label_names(families: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Family names in label order."""
    return sorted(families or FAMILIES)


def limit_per_class(examples: list[Example], per_class: int, seed: int) -> list[Example]:
    """A deterministic subset of at most ``per_class`` examples per label (seeded hash order)."""
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}|{e.text}".encode()).digest())
    out, counts = [], {}
    for e in ranked:
        if counts.get(e.label, 0) < per_class:
            counts[e.label] = counts.get(e.label, 0) + 1
            out.append(e)
    return out
