"""Common record type, errors and the image-loading dataset shared by every reader."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from PIL import Image

ImageSource = Union[str, Callable[[], Image.Image], None]

TASKS = ("caption", "vqa")


class DataError(ValueError):
    """Bad input data: the message names the file and, where there is one, the record."""


@dataclass
class Record:
    """One evaluation / training unit.

    ``image`` is a file path, a zero-argument callable returning a PIL image (the
    synthetic data renders lazily) or None (a text-only record, for text-only models).
    ``question`` is empty for captioning.  ``targets`` are the reference captions
    (captioning) or the human answers (VQA, usually 10).
    """

    id: str
    image: ImageSource
    question: str
    targets: list[str]
    image_id: str = ""
    source: str = ""  # file the record came from, for error messages
    meta: dict = field(default_factory=dict)

    def train_target(self, k: int = 0) -> str:
        """The text trained on: the k-th caption, or the most common answer for VQA."""
        if self.meta.get("task") == "vqa":
            # most common human answer; ties broken by first occurrence (Counter keeps order)
            return Counter(self.targets).most_common(1)[0][0]
        return self.targets[k % len(self.targets)]


def open_image(rec: Record) -> Image.Image | None:
    """Load ``rec.image`` as RGB (None for a text-only record), raising :class:`DataError`
    naming file and record."""
    src = rec.image
    if src is None:
        return None
    if callable(src):
        return src().convert("RGB")
    try:
        with Image.open(src) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{rec.source or src}: record {rec.id!r}: image file not found: {src}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"{rec.source or src}: record {rec.id!r}: unreadable image {src}: {e}") from None


def check_images(records: Sequence[Record], skip_bad_images: bool, what: str) -> tuple[list[Record], int]:
    """Verify every file-backed image once, up front.

    With ``skip_bad_images`` the unreadable ones are dropped and counted; otherwise the
    first one raises :class:`DataError`.  Checking up front means a bad file fails the run
    before any training, and all ranks of a distributed run drop the same records.
    """
    kept, bad = [], 0
    for rec in records:
        if rec.image is None or callable(rec.image):
            kept.append(rec)
            continue
        try:
            with Image.open(rec.image) as im:
                im.verify()
            kept.append(rec)
        except Exception as e:
            if not skip_bad_images:
                reason = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
                raise DataError(
                    f"{rec.source}: record {rec.id!r}: image {rec.image} {reason}; "
                    "pass --skip-bad-images to drop such records") from None
            bad += 1
    if not kept:
        raise DataError(f"{what}: no usable records" + (f" ({bad} bad images skipped)" if bad else ""))
    return kept, bad


class RecordDataset:
    """A torch-style map dataset over records; items are ``(record, PIL image)``."""

    def __init__(self, records: Sequence[Record], task: str, name: str = ""):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.records = list(records)
        self.task = task
        self.name = name
        self.skipped_images = 0
        for r in self.records:
            r.meta.setdefault("task", task)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_images(self) -> bool:
        """Whether the records carry images (a split is all image-text or all text-only)."""
        return bool(self.records) and self.records[0].image is not None

    def __getitem__(self, i: int) -> tuple[Record, Image.Image | None]:
        rec = self.records[i]
        return rec, open_image(rec)


def require_file(path: str, key: str) -> str:
    """Return ``path`` expanded, or raise naming the config key when it does not exist."""
    p = os.path.expanduser(str(path))
    if not os.path.exists(p):
        raise DataError(f"{key}: file not found: {p}")
    return p
