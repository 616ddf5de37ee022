"""Every CPU variant of the C++ extension is built and tested on every host.

The extension's sources compile to an ``avx512`` variant, an ``avx2`` one and a ``generic`` one (the
compiler's baseline, for CPUs with neither; the same ops, different code; the LoRA factor-gradient
op is chosen automatically only in the first); users' CPUs decide which runs. This process tests
the variant of its host (the whole suite); here, every *other* variant is built and, where this CPU
can execute it, the op tests run again in a subprocess with ``PTPEFT_FAST_CPU_ISA=<variant>``. A
variant this CPU cannot execute is compiled (not loaded) and reported as skipped with the reason,
in the summary.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ptpeft_fast import _ext

ROOT = Path(__file__).resolve().parents[1]
CROSS_TESTED = ("avx512", "avx2", "generic")
# The tests that reach the extension's ops directly, each against the float64 reference.
OP_TESTS = ["tests/test_ops_prefix_attention.py", "tests/test_ops_lora_linear.py", "tests/test_ops_adapter.py",
            "tests/test_spectrum_op.py", "tests/test_fuzz_ops.py", "tests/test_backend_fallback.py",
            "tests/test_dispatch.py",
            "tests/test_cpu_variants.py::test_loaded_extension_is_the_requested_variant"]
# Every variant registers every op (the dispatch tables decide where each pays: lora_factor_grads
# only from the avx512 build, whose 32 vector registers it needs to beat BLAS).
EVERY_VARIANT = ("singular_values", "spectrum_stats", "flash_prefix_forward", "flash_prefix_backward",
                 "prefix_decode_attention", "adapter_blocked_forward", "adapter_blocked_backward", "lora_factor_grads")


def test_loaded_extension_is_the_requested_variant():
    assert _ext.load_ext(), f"the csrc extension must build here (design §4): {_ext.ext_error()}"
    variant = _ext.loaded_variant()
    assert variant == _ext.requested_variant() and variant in _ext.executable_variants()
    for op in EVERY_VARIANT:
        assert _ext.has_kernel(op, "CPU"), f"{op} is not registered in the {variant} variant"


def test_unknown_or_unexecutable_variant_is_refused(monkeypatch):
    monkeypatch.setenv(_ext.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="not one of"):
        _ext.requested_variant()
    missing = [v for v in _ext.CPU_VARIANTS if v not in _ext.executable_variants()]
    if missing:
        monkeypatch.setenv(_ext.ISA_ENV, missing[0])
        with pytest.raises(ValueError, match="cannot execute"):
            _ext.requested_variant()
    monkeypatch.setenv(_ext.ISA_ENV, "generic")
    assert _ext.requested_variant() == "generic"


def _other_variants() -> list[str]:
    try:
        own = _ext.requested_variant()
    except ValueError:
        own = None
    return [v for v in CROSS_TESTED if v != own]


@pytest.mark.parametrize("variant", _other_variants())
def test_other_variant_is_built_and_its_op_tests_pass(variant):
    if os.environ.get(_ext.ISA_ENV):
        pytest.skip(f"{_ext.ISA_ENV} is set: this run tests that variant only")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the {variant} variant is for x86-64 CPUs; this is {platform.machine()}")
    if variant not in _ext.executable_variants():
        _ext.compile_variant(variant)  # raises with the compiler's output on failure
        pytest.skip(f"the {variant} variant compiled but was not run: this CPU lacks "
                    f"{', '.join(_ext.missing_cpu_flags(variant))}")
    env = {**os.environ, _ext.ISA_ENV: variant}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, f"the op tests failed on the {variant} variant:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
