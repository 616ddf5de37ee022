"""Just-in-time build of the ``csrc/`` extension (batched spectrum ops, and the CPU fast paths:
prefix attention by blocks of query rows, decode attention, LoRA factor gradients, the prefix
block of the general attention path, the adapter by row blocks).

The extension is compiled once with ninja through :func:`torch.utils.cpp_extension.load`
into the user cache directory (``$PTPEFT_FAST_CACHE``, else ``$XDG_CACHE_HOME/ptpeft_fast``,
else ``~/.cache/ptpeft_fast``), keyed by a hash of the sources and the torch version, and
registers its ops under ``torch.ops.ptpeft_fast``. If no compiler works the build error is
reported by ONE warning and callers use the torch path; nothing here raises.

Set ``PTPEFT_FAST_NO_EXT=1`` to skip the extension entirely (the torch path runs).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["csrc_dir", "cache_dir", "load_ext", "ext_error", "has_kernel"]

logger = logging.getLogger(__name__)

_CPU_SOURCES = ("spectrum_cpu.cpp", "decode_attention_cpu.cpp", "lora_grads_cpu.cpp", "prefix_block_cpu.cpp",
                "adapter_cpu.cpp", "prefix_flash_cpu.cpp")
_CUDA_SOURCES = ("spectrum_cuda.cu", "spectrum_cuda_binding.cpp")
_HEADERS = ("spectrum_cuda.h", "cpu_math.h")

_error: list[str] = []


def csrc_dir() -> Path | None:
    """Directory holding the C++/CUDA sources: inside the installed package, else the repo's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / _CPU_SOURCES[0]).is_file():
            return cand
    return None


def cache_dir() -> Path:
    """Root of the build cache for compiled extensions."""
    root = os.environ.get("PTPEFT_FAST_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ptpeft_fast"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``ptpeft_fast::<op>`` has a kernel registered for ``dispatch_key`` (``"CPU"``, ``"CUDA"``)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"ptpeft_fast::{op}", dispatch_key))
    except Exception:  # op not defined at all
        return False


def _want_cuda() -> bool:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _cpu_flags() -> list[str]:
    """SIMD and OpenMP flags for the CPU sources.

    AVX2 + FMA (and AVX-512 where torch reports it) let the decode op's dot products and
    exponentials and the LoRA kernel's FMAs vectorise (the decode op about 1.5x faster). The
    build cache is keyed by these flags, so a cache shared with an older CPU never loads
    these instructions there. OpenMP: ``at::parallel_for`` is a header template that runs
    serially unless the extension itself is compiled with ``-fopenmp``.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl"]}.get(cap, [])
    if _openmp_ok():
        flags.append("-fopenmp")
    return flags


def _openmp_ok() -> bool:
    """torch uses OpenMP for intra-op threads and the compiler is GCC-like (Linux)."""
    return torch.backends.openmp.is_available() and sys.platform.startswith("linux")


def _build(src: Path, with_cuda: bool) -> None:
    from torch.utils.cpp_extension import load

    names = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    digest = hashlib.sha256()
    for name in names + _HEADERS:
        path = src / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(str(with_cuda).encode())
    cpu_flags = _cpu_flags()
    digest.update(" ".join(cpu_flags).encode())
    tag = digest.hexdigest()[:16]
    # The module name carries the hash so two versions never collide in one cache or process.
    name = f"ptpeft_fast_ext_{tag}"
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags = ["-O3", *cpu_flags] + (["-DPTPEFT_FAST_WITH_CUDA"] if with_cuda else [])
    if not (build_dir / f"{name}.so").exists():
        # the first call otherwise looks like a hang: a CPU build takes about a minute on 2 cores
        logger.warning("ptpeft_fast: compiling the C++ extension once (about a minute); cached in %s", build_dir)
    load(
        name=name,
        sources=[str(src / n) for n in names],
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3"],
        # -ldl: prefix_flash_cpu.cpp looks up torch's sgemm with dlsym (libc has it from glibc 2.34)
        extra_ldflags=(["-fopenmp"] if "-fopenmp" in cpu_flags else []) + (["-ldl"] if sys.platform.startswith("linux") else []),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,  # the library registers torch ops; it has no Python module
        verbose=os.environ.get("PTPEFT_FAST_VERBOSE_BUILD", "0") == "1",
    )


@functools.lru_cache(maxsize=None)
def load_ext() -> bool:
    """Build (once, cached) and load the extension; True when its CPU ops are registered.

    Never raises: on failure it warns once and returns False, and callers use the torch path.
    """
    if has_kernel("singular_values", "CPU"):
        return True  # already loaded (ahead-of-time build or an earlier call)
    if os.environ.get("PTPEFT_FAST_NO_EXT", "0") == "1":
        _error.append("disabled by PTPEFT_FAST_NO_EXT=1")
        return False
    src = csrc_dir()
    if src is None:
        _error.append("csrc/ sources not found next to the package")
    else:
        attempts = [True, False] if _want_cuda() else [False]
        for with_cuda in attempts:
            try:
                _build(src, with_cuda)
                break
            except Exception as exc:  # compiler missing, ninja missing, build error...
                _error.append(f"{'CUDA' if with_cuda else 'CPU'} build failed: {type(exc).__name__}: {exc}")
    if has_kernel("singular_values", "CPU"):
        return True
    warnings.warn(
        "ptpeft_fast: the C++ extension (spectrum statistics, CPU attention and LoRA fast paths) is unavailable, "
        f"using the slower torch paths. Reason: {'; '.join(_error)[-2000:]}",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def ext_error() -> str | None:
    """Why the extension did not load (None when it loaded or was never tried)."""
    return "; ".join(_error) if _error else None
