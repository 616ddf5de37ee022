"""Just-in-time build of the ``csrc/`` extension (batched spectrum ops, and the CPU fast paths:
prefix attention by blocks of query rows, decode attention, LoRA factor gradients, the adapter by
row blocks).

The extension is compiled once with ninja through :func:`torch.utils.cpp_extension.load`
into the user cache directory (``$PTPEFT_FAST_CACHE``, else ``$XDG_CACHE_HOME/ptpeft_fast``,
else ``~/.cache/ptpeft_fast``), keyed by a hash of the sources and the torch version, and
registers its ops under ``torch.ops.ptpeft_fast``. If no compiler works the build error is
reported by ONE warning and callers use the torch path; nothing here raises.

Set ``PTPEFT_FAST_NO_EXT=1`` to skip the extension entirely (the torch path runs).

Instruction-set variants: the CPU sources are built for one of :data:`CPU_VARIANTS` —
``avx512`` (AVX-512F/VL; the only build that registers the LoRA factor-gradient and prefix-block
ops), ``avx2`` (AVX2 + FMA) or ``generic`` (the compiler's baseline). By default the best one
this CPU executes; ``PTPEFT_FAST_CPU_ISA=<variant>`` selects another at build time (each variant
has its own cache key), which is how the test suite runs the portable variant on an AVX-512
host. A variant this CPU cannot execute is refused (the torch path runs), never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from ._sources import source_dir
from .cache import cache_dir

__all__ = ["CPU_VARIANTS", "csrc_dir", "load_ext", "ext_error", "has_kernel", "executable_variants",
           "requested_variant", "loaded_variant", "compile_variant", "missing_cpu_flags", "ISA_ENV",
           "build_name"]

logger = logging.getLogger(__name__)

_CPU_SOURCES = ("spectrum_cpu.cpp", "decode_attention_cpu.cpp", "lora_grads_cpu.cpp", "adapter_cpu.cpp",
                "prefix_flash_cpu.cpp")
_CUDA_SOURCES = ("spectrum_cuda.cu", "spectrum_cuda_binding.cpp")
_HEADERS = ("spectrum_cuda.h", "cpu_math.h")

_error: list[str] = []
_loaded: list[str] = []  # the variant this process built and loaded (plain value, set once)

#: Instruction-set variants of the CPU build, best first, with their compiler flags.
CPU_VARIANTS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512vl"),
    "avx2": ("-mavx2", "-mfma"),
    "generic": (),
}
# /proc/cpuinfo flags each variant needs (x86-64); "generic" needs none.
_VARIANT_CPU_FLAGS = {"avx512": ("avx2", "fma", "avx512f", "avx512vl"), "avx2": ("avx2", "fma"), "generic": ()}
ISA_ENV = "PTPEFT_FAST_CPU_ISA"
STALE_LOCK_S = 900  # a build lock older than this is left over from a killed build (builds take ~1-2 min)


def csrc_dir() -> Path | None:
    """Directory holding the C++/CUDA sources: inside the installed package, else the repo's ``csrc/``."""
    return source_dir("csrc", _CPU_SOURCES[0])


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


@functools.lru_cache(maxsize=None)
def _host_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where there is none to read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return frozenset(line.split(":", 1)[1].split())


def missing_cpu_flags(variant: str) -> list[str]:
    """The CPU features ``variant`` needs and this machine lacks (empty: it can execute it)."""
    if variant == "generic":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["x86-64"]  # the -m flags exist only for x86-64 compilers
    have = _host_flags()
    if have is None:  # no /proc/cpuinfo: trust torch's own capability
        cap = torch.backends.cpu.get_cpu_capability()
        have = frozenset(_VARIANT_CPU_FLAGS["avx512" if cap == "AVX512" else "avx2" if cap == "AVX2" else "generic"])
    return [f for f in _VARIANT_CPU_FLAGS[variant] if f not in have]


def executable_variants() -> tuple[str, ...]:
    """The CPU variants this machine can execute, best first (``generic`` always)."""
    return tuple(v for v in CPU_VARIANTS if not missing_cpu_flags(v))


def requested_variant() -> str:
    """The variant this process builds: ``$PTPEFT_FAST_CPU_ISA`` when set, else the best executable one.

    Raises:
        ValueError: an unknown name, or a variant this CPU cannot execute (named with the fix).
    """
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want or want == "native":
        return executable_variants()[0]
    if want not in CPU_VARIANTS:
        raise ValueError(f"{ISA_ENV}={want!r} is not one of {sorted(CPU_VARIANTS)} or 'native'")
    if want not in executable_variants():
        raise ValueError(f"{ISA_ENV}={want}: this CPU cannot execute that variant (it runs "
                         f"{', '.join(executable_variants())}); unset {ISA_ENV} to build the best one")
    return want


def loaded_variant() -> str | None:
    """The variant of the extension this process loaded (None before :func:`load_ext` succeeded)."""
    return _loaded[0] if _loaded else None


def _cpu_flags(variant: str) -> list[str]:
    """SIMD and OpenMP flags for the CPU sources of ``variant``.

    AVX2 + FMA (and AVX-512) let the decode op's dot products and exponentials and the LoRA
    kernel's FMAs vectorise (the decode op about 1.5x faster). The build cache is keyed by
    these flags, so variants never load each other's build. OpenMP: ``at::parallel_for`` is a
    header template that runs serially unless the extension itself is compiled with ``-fopenmp``.
    """
    flags = list(CPU_VARIANTS[variant])
    if _openmp_ok():
        flags.append("-fopenmp")
    return flags


def _openmp_ok() -> bool:
    """torch uses OpenMP for intra-op threads and the compiler is GCC-like (Linux)."""
    return torch.backends.openmp.is_available() and sys.platform.startswith("linux")


def build_name(src: Path, variant: str, with_cuda: bool) -> str:
    """The extension's module and cache-folder name: a hash of every source and header, torch's
    version and every compiler flag. Two checkouts of the same sources share one build; changed
    sources, another ISA variant or other flags get their own, so they never rebuild each other's."""
    digest = hashlib.sha256()
    for name in _sources(with_cuda) + _HEADERS:
        path = src / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_cflags(variant, with_cuda) + _ldflags(variant)).encode())
    return f"ptpeft_fast_ext_{digest.hexdigest()[:16]}"


def _sources(with_cuda: bool) -> tuple[str, ...]:
    return _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())


def _cflags(variant: str, with_cuda: bool) -> list[str]:
    return ["-O3", *_cpu_flags(variant)] + (["-DPTPEFT_FAST_WITH_CUDA"] if with_cuda else [])


def _ldflags(variant: str) -> list[str]:
    # -ldl: prefix_flash_cpu.cpp looks up torch's sgemm with dlsym (libc has it from glibc 2.34)
    return ((["-fopenmp"] if "-fopenmp" in _cpu_flags(variant) else [])
            + (["-ldl"] if sys.platform.startswith("linux") else []))


def _build(src: Path, with_cuda: bool, variant: str) -> None:
    from torch.utils.cpp_extension import load

    names = _sources(with_cuda)
    # The module name carries the hash so two versions never collide in one cache or process.
    name = build_name(src, variant, with_cuda)
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{name}.so"
    if so.exists():
        # Built before (the name hashes sources and flags): load it without torch's build lock, which
        # a process killed during an earlier load leaves behind and every later load() waits on forever.
        try:
            torch.ops.load_library(str(so))
            return
        except OSError as exc:  # a partial file from a killed link: rebuild
            logger.warning("ptpeft_fast: the cached extension %s does not load (%s); rebuilding", so, exc)
            so.unlink()
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        logger.warning("ptpeft_fast: removing a build lock left %d minutes ago by a build that did not finish (%s)",
                       (time.time() - lock.stat().st_mtime) // 60, lock)
        lock.unlink(missing_ok=True)
    # the first call otherwise looks like a hang: a CPU build takes about a minute on 2 cores
    logger.warning("ptpeft_fast: compiling the C++ extension (%s variant) once (about a minute); cached in %s",
                   variant, build_dir)
    load(
        name=name,
        sources=[str(src / n) for n in names],
        extra_cflags=_cflags(variant, with_cuda),
        extra_cuda_cflags=["-O3"],
        extra_ldflags=_ldflags(variant),
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
    variant = None
    try:
        variant = requested_variant()
    except ValueError as exc:
        _error.append(str(exc))
    if src is None:
        _error.append("csrc/ sources not found next to the package")
    elif variant is not None:
        attempts = [True, False] if _want_cuda() else [False]
        for with_cuda in attempts:
            try:
                _build(src, with_cuda, variant)
                break
            except Exception as exc:  # compiler missing, ninja missing, build error...
                _error.append(f"{'CUDA' if with_cuda else 'CPU'} build failed: {type(exc).__name__}: {exc}")
    if has_kernel("singular_values", "CPU"):
        _loaded.append(variant)
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


def compile_variant(variant: str) -> None:
    """Compile (not load) the CPU sources for ``variant``: the check for a variant this CPU cannot
    execute. Each source goes through the C++ compiler with the flags of a real build; a success is
    remembered in the cache (keyed like a build), so a later call returns at once.

    Raises:
        ValueError: unknown variant.
        RuntimeError: the sources are missing, or a compile failed (its compiler output included).
    """
    if variant not in CPU_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {sorted(CPU_VARIANTS)}")
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import include_paths

    src = csrc_dir()
    if src is None:
        raise RuntimeError("csrc/ sources not found next to the package")
    flags = _cpu_flags(variant)
    stamp = cache_dir() / "compile-check" / f"{variant}-{build_name(src, variant, False)}.ok"
    if stamp.is_file():
        return
    cxx = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    base = [cxx, "-c", "-O3", "-std=c++17", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=ptpeft_fast_compile_check",
            *[f"-isystem{p}" for p in include_paths()], *flags, "-o", os.devnull]

    def one(name: str) -> str | None:
        run = subprocess.run([*base, str(src / name)], capture_output=True, text=True)
        return None if run.returncode == 0 else f"{name}:\n{run.stderr[-3000:]}"

    with ThreadPoolExecutor(max_workers=max(1, min(len(_CPU_SOURCES), os.cpu_count() or 1))) as pool:
        failures = [f for f in pool.map(one, _CPU_SOURCES) if f]
    if failures:
        raise RuntimeError(f"the {variant} variant does not compile:\n" + "\n".join(failures))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(base) + "\n")
