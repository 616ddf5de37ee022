"""``stdlib-code-captions``: real code captioning from the Python standard library, offline.

Each record pairs a public function's or method's signature, written as its ``def`` line
(``def urljoin(base, url, allow_fragments=True):``), with the first sentence of its docstring
("Join a base URL and a possibly relative URL to form an absolute interpretation of the
latter."): the model reads the signature and writes the sentence, scored like a caption
(CIDEr-D, BLEU-4, ROUGE-L). Nothing is downloaded: the text ships with every Python, and is
the same on every machine with the same Python version (a patch release may change a docstring).

The split is by module (a seeded hash of the module name), so the test modules' functions are
unseen in training. A sentence is kept once over the whole corpus (the first in module order),
so an inherited or copied docstring cannot leak from training into test.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys

from .records import DataError, Record
from .stdlib_docstrings import split_of

__all__ = ["MODULES", "build_records", "first_sentence"]

# pure-Python modules whose public functions have docstrings and signatures (a C function's
# signature is often unknown); none that may be missing from a Python build (ssl, tkinter), and
# none whose defaults depend on the machine (platform: the interpreter's path; sysconfig: the
# distribution's install scheme). Modules that gave no record on Python 3.11 are left out.
MODULES: tuple[str, ...] = (
    "ast", "base64", "calendar", "cmd", "codecs", "collections", "configparser", "contextlib", "copy",
    "dataclasses", "difflib", "dis", "doctest", "email.message", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.metadata",
    "inspect", "ipaddress", "json.decoder", "json.encoder", "linecache", "locale", "logging", "logging.handlers",
    "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "ntpath", "numbers", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "poplib", "posixpath", "pprint", "profile", "pstats",
    "pydoc", "queue", "quopri", "random", "re", "rlcompleter", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "webbrowser", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.saxutils", "zipfile", "zipimport", "asyncio.base_events", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.tasks", "email.headerregistry",
)
SPLITS = ("train", "val", "test")

_MACHINE_PATHS = tuple({p for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.expanduser("~")) if p != "/"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")


def first_sentence(doc: str, min_words: int = 4, max_words: int = 30) -> str | None:
    """The docstring's first sentence (its first paragraph's lines joined), or None when it is
    not a plain sentence of ``min_words``..``max_words`` words ending in a full stop."""
    para = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    text = " ".join(" ".join(para).split())
    s = _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""
    words = s.split()
    if not (min_words <= len(words) <= max_words) or not s[:1].isupper() or not s.endswith("."):
        return None
    if s.endswith(("e.g.", "i.e.")):  # cut at an abbreviation, not a sentence
        return None
    if sum(c.isalpha() or c == " " for c in s) < 0.8 * len(s):  # mostly code, numbers or markup
        return None
    return s


def _def_line(name: str, obj: object, max_chars: int) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a text signature
        return None
    line = f"def {name}{sig}:"
    if any(p in line for p in _MACHINE_PATHS):  # a default that names this machine's files
        return None
    return line if len(line) <= max_chars and "<" not in line else None  # "<object ...>" defaults say nothing


def _pairs(module_name: str, max_chars: int) -> list[tuple[str, str, str]]:
    """``(qualified name, def line, first sentence)`` for the module's public functions and the
    public methods of its public classes."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. ssl on a Python built without OpenSSL
        return []
    out = []
    for name in sorted(dir(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        members = [(name, obj)] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):  # a method's def line names its class: "def Request.get_method(self):"
            members += [(f"{name}.{m}", f) for m, f in sorted(vars(obj).items())
                        if not m.startswith("_") and inspect.isfunction(f)]
        for qual, f in members:
            sentence = first_sentence(inspect.getdoc(f) or "")
            line = _def_line(qual, f, max_chars) if sentence else None
            if line:
                out.append((f"{module_name}.{qual}", line, sentence))
    return out


def build_records(split: str, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  max_chars: int = 100) -> list[Record]:
    """The caption records of one split: ``question`` is the ``def`` line (a method's names its
    class), ``targets`` the first
    docstring sentence, ``image`` None; ids are qualified names, in a seeded hash order."""
    if split not in SPLITS:
        raise DataError(f"stdlib-code-captions has splits {SPLITS}, not {split!r}")
    seen: set[str] = set()
    out = []
    for module_name in MODULES:
        where = split_of(module_name, seed, fractions)
        for qual, line, sentence in _pairs(module_name, max_chars):
            if sentence in seen:
                continue
            seen.add(sentence)
            if where == split:
                out.append(Record(qual, None, line, [sentence], image_id=qual,
                                  source=f"stdlib-code-captions/{split}", meta={"task": "caption",
                                                                                "module": module_name}))
    # a seeded hash order, so that the first N records (max_samples) come from many modules
    return sorted(out, key=lambda r: hashlib.sha256(f"{seed}|{r.id}".encode()).digest())
