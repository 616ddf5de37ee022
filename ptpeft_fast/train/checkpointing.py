"""Atomic folders: written beside their final name and renamed into place, with a ``COMPLETE``
file listing the SHA-256 of every file; and the checks that find the complete copy to read.
(The file names of a run folder are in :mod:`.run_folder`.)"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from ..atomic_files import atomic_write_text, sha256_file, temporary_name
from .run_folder import MANIFEST

__all__ = ["atomic_dir", "folder_damage", "complete_dir", "folder_copies"]


def atomic_dir(final: str, write: Callable[[str], None], keep_previous: bool = False) -> None:
    """Write a folder via ``write(tmp)`` and swap it in: the old copy stays valid until the
    new one is complete, so a kill at any moment leaves one complete checkpoint. The folder's
    ``COMPLETE`` file, written last, lists the SHA-256 of every file (checked on reading).
    ``keep_previous``: the copy it replaces stays as ``<final>.prev`` (a fallback if the new
    one is later found damaged). A failed write removes its temporary folder."""
    tmp = temporary_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        sums = {os.path.relpath(os.path.join(base, f), tmp): sha256_file(os.path.join(base, f))
                for base, _, files in os.walk(tmp) for f in sorted(files)}
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps({"sha256": sums}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{final}.prev" if keep_previous else f"{final}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)


def folder_damage(folder: str) -> str | None:
    """What is wrong with an atomically written folder (None: complete and every file matches
    its checksum). A ``COMPLETE`` file of older versions (no checksums) counts as complete."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return f"{folder} is incomplete (no {MANIFEST} file)"
    try:
        text = open(manifest, encoding="utf-8").read()
    except OSError as e:
        return f"{manifest} cannot be read ({e.strerror})"
    except ValueError:
        return f"{manifest} is damaged (not the checksum list ptpeft_fast writes)"
    if text.strip() == "ok":
        return None
    try:
        sums = json.loads(text)["sha256"]
    except (ValueError, KeyError, TypeError):
        sums = None
    if not isinstance(sums, dict) or any(not isinstance(n, str) or os.path.isabs(n) or ".." in n.split(os.sep)
                                         for n in sums):
        return f"{manifest} is damaged (not the checksum list ptpeft_fast writes)"
    for name, digest in sums.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} is damaged (its checksum does not match {MANIFEST})"
    return None


def complete_dir(final: str) -> str | None:
    """The complete, undamaged copy of an atomically written folder (the newest first), else None."""
    for d in folder_copies(final):
        if folder_damage(d) is None:
            return d
    return None


def folder_copies(final: str) -> list[str]:
    """The copies of an atomically written folder that exist, newest first."""
    return [d for d in (final, f"{final}.old", f"{final}.prev") if os.path.isdir(d)]
