"""The one place that decides which implementation of an op runs.

``auto`` picks Triton for CUDA tensors when Triton imports, and the torch reference
path otherwise. ``torch`` forces the reference path; ``triton`` forces the Triton
kernels (on CPU tensors only under ``TRITON_INTERPRET=1``, which is how tests run them);
``xformers`` is offered for prefix attention on CUDA.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "torch", "triton", "xformers")

_forced: list[str] = []
T = TypeVar("T")


class BackendUnsupported(ValueError):
    """A kernel backend does not handle these arguments (the torch path does)."""


def try_kernel(requested: str, call: Callable[[], T]) -> T | None:
    """Run ``call`` (a kernel backend); return None when it refuses the arguments and the
    backend was chosen automatically, so the caller takes the torch path. A backend the user
    asked for by name (argument or :func:`use_backend`) re-raises its refusal."""
    try:
        return call()
    except BackendUnsupported:
        if requested == "auto" and not _forced:
            return None
        raise


def interpreter_on() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True when ``xformers.ops`` can be imported."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def forced_backend() -> str | None:
    """The backend forced by the innermost :func:`use_backend` block, or None."""
    return _forced[-1] if _forced else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called with ``backend="auto"`` inside the block."""
    _check_name(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")


def resolve_backend(op: str, requested: str, *tensors: torch.Tensor, supported: tuple[str, ...] = ("torch", "triton")) -> str:
    """Return the backend that runs ``op`` for ``tensors``.

    Raises ``ValueError`` when the requested backend cannot run here, naming the fix.
    """
    _check_name(requested)
    if requested == "auto" and _forced:
        requested = forced_backend()
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if requested == "auto":
        if on_cuda and "triton" in supported and triton_available():
            return "triton"
        return "torch"
    if requested not in supported:
        raise ValueError(f"{op}: backend={requested!r} is not offered for this op; choose one of {('auto',) + supported}")
    if requested == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton); use backend='torch'")
        if not on_cuda and not interpreter_on():
            raise ValueError(
                f"{op}: backend='triton' got CPU tensors; Triton runs on CPU only in its interpreter: "
                "set TRITON_INTERPRET=1 before importing triton, move the tensors to CUDA, or use backend='torch'"
            )
    if requested == "xformers":
        if not on_cuda:
            raise ValueError(f"{op}: backend='xformers' needs CUDA tensors; use backend='torch' on CPU")
        if not xformers_available():
            raise ValueError(f"{op}: backend='xformers' needs xformers (pip install 'ptpeft_fast[xformers]')")
    return requested


@functools.lru_cache(maxsize=None)
def cpu_ext_op(name: str) -> Callable | None:
    """``torch.ops.ptpeft_fast.<name>`` from the C++ extension (``csrc/``) when it built and has a
    CPU kernel for that op, else None (the caller runs its torch path). The first call builds
    the extension (cached on disk)."""
    from .. import _ext

    if _ext.load_ext() and _ext.has_kernel(name, "CPU"):
        return getattr(torch.ops.ptpeft_fast, name)
    return None
