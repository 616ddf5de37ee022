"""The extension's build name hashes every source, header and flag: two checkouts of the same sources
share one build, and changed sources or another CPU variant get their own (never rebuilding each other's)."""
import shutil

from ptpeft_fast import _ext


def test_build_name_follows_sources_and_flags_not_location(tmp_path):
    src = _ext.csrc_dir()
    a, b = tmp_path / "checkout-a" / "csrc", tmp_path / "checkout-b" / "csrc"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    name = _ext.build_name(a, "generic", False)
    assert name == _ext.build_name(b, "generic", False) == _ext.build_name(src, "generic", False)
    assert len({_ext.build_name(a, v, False) for v in _ext.CPU_VARIANTS}) == len(_ext.CPU_VARIANTS)
    assert _ext.build_name(a, "generic", True) != name
    (b / "cpu_math.h").write_text((b / "cpu_math.h").read_text() + "\n// another version\n")
    assert _ext.build_name(b, "generic", False) != name
    (a / "adapter_cpu.cpp").write_text((a / "adapter_cpu.cpp").read_text() + " ")
    assert _ext.build_name(a, "generic", False) not in (name, _ext.build_name(b, "generic", False))
