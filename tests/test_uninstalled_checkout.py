"""The checkout works without installation (``PYTHONPATH=<checkout>``), as on a GPU machine whose
image has no package registry: every module imports, ``ptpeft_fast.kernels`` and the C++ sources
are the checkout's own top-level ``kernels/`` and ``csrc/``.

The subprocess runs with ``-S`` and the environment's site-packages on ``PYTHONPATH``: that keeps
torch and the other dependencies but drops the ``.pth`` hooks of an editable install, so nothing
installed can stand in for the checkout.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = r'''
import importlib, importlib.util, pkgutil, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
assert not any("editable" in type(f).__name__.lower() for f in sys.meta_path), sys.meta_path
import ptpeft_fast
optional = {"triton": "ptpeft_fast.ops.triton_ops", "xformers": "ptpeft_fast.ops.xformers_ops"}
skip = {mod for dep, mod in optional.items() if importlib.util.find_spec(dep) is None}
names = [m.name for m in pkgutil.walk_packages(ptpeft_fast.__path__, "ptpeft_fast.")
         if not m.name.endswith("__main__") and m.name not in skip]
if importlib.util.find_spec("triton") is not None:
    import ptpeft_fast.kernels
    names += [m.name for m in pkgutil.iter_modules(ptpeft_fast.kernels.__path__, "ptpeft_fast.kernels.")]
for name in names:
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve().is_relative_to(root), (name, mod.__file__)
if "ptpeft_fast.kernels" in sys.modules:  # namespace-style: kernels/ has no __init__.py (_sources.py)
    assert [Path(p).resolve() for p in sys.modules["ptpeft_fast.kernels"].__path__] == [root / "kernels"]
from ptpeft_fast import _ext
assert _ext.csrc_dir() == root / "csrc", _ext.csrc_dir()
print("imported", len(names))
'''


def test_every_module_imports_from_an_uninstalled_checkout():
    paths = [str(ROOT)] + sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PTPEFT_FAST_NO_EXT": "1"}
    res = subprocess.run([sys.executable, "-S", "-c", CODE, str(ROOT)], cwd="/", env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert int(res.stdout.split()[-1]) > 40, res.stdout
