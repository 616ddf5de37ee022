"""What this process can run, decided once and kept as plain values.

The dispatch tables (:mod:`.dispatch`) ask these questions on every call. Each answer is computed
on first use (building the C++ extension if needed, importing Triton or xformers) and cached; the
functions are marked :func:`torch.compiler.assume_constant_result`, so inside a region that
``torch.compile`` traces they are constants: no file system, dispatcher or import question is
traced. :func:`prepare` answers them all up front; ``patch`` calls it, so a compiled patched model
never builds anything while it is traced.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["ext_op", "ext_variant", "triton_ok", "xformers_ok", "interpreter_on", "flash_prefix_blas",
           "triton_declines", "prepare"]

_facts: dict[str, object] = {}


def _fact(key: str, compute) -> object:
    if key not in _facts:
        _facts[key] = compute()
    return _facts[key]


def _ext_loaded() -> bool:
    from .. import _ext

    return _ext.load_ext()


@torch.compiler.assume_constant_result
def ext_op(name: str) -> bool:
    """True when the C++ extension built and registers a CPU kernel for ``ptpeft_fast::<name>``."""
    def compute() -> bool:
        from .. import _ext

        return _ext_loaded() and _ext.has_kernel(name, "CPU")

    return bool(_fact(f"ext_op:{name}", compute))


@torch.compiler.assume_constant_result
def ext_variant() -> str:
    """The CPU variant of the loaded extension (``avx512``, ``avx2``, ``generic``), or ``""`` without one."""
    def compute() -> str:
        from .. import _ext

        return (_ext.loaded_variant() or "") if _ext_loaded() else ""

    return str(_fact("ext_variant", compute))


@torch.compiler.assume_constant_result
def flash_prefix_blas() -> bool:
    """The extension's block path found the BLAS ``sgemm`` torch exports (MKL in the x86 Linux wheels)."""
    def compute() -> bool:
        return ext_op("flash_prefix_forward") and bool(torch.ops.ptpeft_fast.flash_prefix_available())

    return bool(_fact("flash_prefix_blas", compute))


def _imports(module: str) -> bool:
    """``module`` imports (a broken install counts as absent)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


@torch.compiler.assume_constant_result
def triton_ok() -> bool:
    """The ``triton`` package imports."""
    return bool(_fact("triton", lambda: _imports("triton")))


@torch.compiler.assume_constant_result
def xformers_ok() -> bool:
    """``xformers.ops`` imports."""
    return bool(_fact("xformers", lambda: _imports("xformers.ops")))


@torch.compiler.assume_constant_result
def interpreter_on() -> bool:
    """Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, read once)."""
    return bool(_fact("interpreter", lambda: os.environ.get("TRITON_INTERPRET", "0") == "1"))


def triton_declines(device: str, dtype: torch.dtype) -> "str | None":
    """Why a Triton kernel cannot run on tensors of this device type and dtype (None if it can):
    Triton present; CUDA, or CPU under the interpreter; fp16/bf16/fp32."""
    if not triton_ok():
        return "triton is not installed"
    if device == "cpu" and not interpreter_on():
        return "CPU tensors: Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1)"
    if device not in ("cpu", "cuda"):
        return f"{device} tensors"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} (fp16/bf16/fp32 only)"
    return None


def prepare() -> None:
    """Answer every question now (build the extension, import the kernel packages)."""
    for name in ("flash_prefix_forward", "prefix_decode_attention", "lora_factor_grads", "adapter_blocked_forward",
                 "singular_values"):
        ext_op(name)
    ext_variant()
    flash_prefix_blas()
    triton_ok()
    xformers_ok()
    interpreter_on()
