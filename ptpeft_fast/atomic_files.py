"""Atomic file writes, the one temporary-name pattern they use, and its cleanup.

Every file and folder ptpeft_fast writes goes through a temporary named ``<name>.tmp-<pid>`` in
the same folder, then a rename: a crash leaves the old file or the new one, never half of one.
:func:`remove_stale_temporaries` knows that pattern, so what a killed writer left is removed and
what a running writer is still writing is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

__all__ = ["temporary_name", "atomic_write_bytes", "atomic_write_text", "sha256_file", "remove_stale_temporaries"]

_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def temporary_name(path: str | os.PathLike) -> str:
    """Where ``path`` is written before it is renamed into place (this process's own name)."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`temporary_name` and a rename (fsync'ed); a failed
    write removes its temporary."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(root: str | os.PathLike) -> list[str]:
    """Delete the temporaries (:func:`temporary_name`) that a killed writer left under ``root``; a
    writer that is still running keeps its own. Returns what was removed."""
    removed = []
    for base, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            m = _TEMPORARY.search(name)
            if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            path = os.path.join(base, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            removed.append(path)
    return removed
