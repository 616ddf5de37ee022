"""Run-folder files: atomic writes, atomically written folders with a checksum list, and the
mid-stage trainer state (safetensors + JSON, never a pickle). Shared by every kind of run."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable

import torch

__all__ = ["DamagedState", "STATE_FORMAT", "MANIFEST", "read_tensors", "read_state", "atomic_write_text", "sha256_file",
           "atomic_dir", "folder_damage", "remove_stale_temporaries", "complete_dir", "folder_copies", "cache_dir"]


class DamagedState(Exception):
    """A run folder's saved state cannot be used; the message names the file and the fix."""


STATE_FORMAT = 2  # 1: trainer.pt (a pickle; read only with weights_only=True), 2: trainer.json + .safetensors


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or :class:`DamagedState` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise DamagedState(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def read_state(path: str) -> dict:
    """The trainer state of one state folder; never unpickles anything but plain data."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..state_files import StateFormatError, decode
    meta_path = os.path.join(path, "trainer.json")
    if not os.path.exists(meta_path):
        legacy = os.path.join(path, "trainer.pt")
        if not os.path.exists(legacy):
            raise DamagedState(f"{path} holds no trainer.json")
        import pickle
        try:  # written by an older ptpeft_fast: plain tensors and numbers, so weights_only suffices
            return torch.load(legacy, weights_only=True)
        except pickle.UnpicklingError:
            raise DamagedState(f"{legacy} holds objects other than tensors and numbers; it was not loaded, since "
                               "unpickling them could run code") from None
        except Exception as e:
            raise DamagedState(f"{legacy} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    try:
        meta = json.loads(open(meta_path, encoding="utf-8").read())
        tensors = load_file(os.path.join(path, "trainer.safetensors"))
        state = decode(meta["state"], tensors)
        return {"stage": str(meta["stage"]), "step": int(meta["step"]), "fsdp": bool(meta.get("fsdp")), **state}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, StateFormatError) as e:
        raise DamagedState(f"{path}'s trainer state cannot be read ({type(e).__name__}: {e})") from None


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MANIFEST = "COMPLETE"          # written last into an atomically written folder: the SHA-256 of every file


def sha256_file(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_dir(final: str, write: Callable[[str], None], keep_previous: bool = False) -> None:
    """Write a folder via ``write(tmp)`` and swap it in: the old copy stays valid until the
    new one is complete, so a kill at any moment leaves one complete checkpoint. The folder's
    ``COMPLETE`` file, written last, lists the SHA-256 of every file (checked on reading).
    ``keep_previous``: the copy it replaces stays as ``<final>.prev`` (a fallback if the new
    one is later found damaged). A failed write removes its temporary folder."""
    tmp = f"{final}.tmp-{os.getpid()}"
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(root: str) -> list[str]:
    """Delete the ``*.tmp-<pid>`` files and folders that a killed writer left under ``root``
    (its own output directory: ``state``, ``checkpoints/…``, ``progress.json``); a writer
    that is still running keeps its own. Returns what was removed."""
    import re
    removed = []
    pattern = re.compile(r"\.tmp-(\d+)$")
    for base, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            m = pattern.search(name)
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


def complete_dir(final: str) -> str | None:
    """The complete, undamaged copy of an atomically written folder (the newest first), else None."""
    for d in folder_copies(final):
        if folder_damage(d) is None:
            return d
    return None


def folder_copies(final: str) -> list[str]:
    """The copies of an atomically written folder that exist, newest first."""
    return [d for d in (final, f"{final}.old", f"{final}.prev") if os.path.isdir(d)]


def cache_dir() -> str:
    """Where built-in assets (the pre-trained tiny-blip2) are cached."""
    d = os.environ.get("PTPEFT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ptpeft_fast")
    os.makedirs(d, exist_ok=True)
    return d
