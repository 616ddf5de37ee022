"""Nothing of ours is importable under a name another package uses (issue 30).

A command run from the checkout root has that root first on ``sys.path``. Our top-level
``kernels/`` once held an ``__init__.py``, so ``import kernels`` found it instead of Hugging Face's
``kernels`` package, which transformers >= 5.25 imports: the README's first command died before any
work. Now ``kernels/`` and ``csrc/`` are plain folders (at most namespace portions, which any
installed package outranks) and the Triton sources refuse to load as a top-level ``kernels``.

The end-to-end check runs from the checkout root with the checkout first on ``PYTHONPATH`` (as an
uninstalled checkout is used) and a ``kernels`` package installed after it: Hugging Face's own
where it is installed (the tested stack), else a stand-in regular package (the oldest stack, whose
transformers does not import it), so both stacks test the same resolution order.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level folders that are regular packages on purpose. ``benchmarks`` is one so that pytest
# imports ``benchmarks/conftest.py`` as a package module beside ``tests/conftest.py``; no
# distribution on the package index provides a top-level ``benchmarks``.
REGULAR_PACKAGES = {"ptpeft_fast", "benchmarks"}


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_only_our_own_names_are_regular_packages_at_the_root():
    regular = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert regular == REGULAR_PACKAGES, (
        f"{sorted(regular - REGULAR_PACKAGES)} at the checkout root would shadow any installed package of that "
        "name for commands run there; keep such folders without __init__.py (see ptpeft_fast/_sources.py)")
    assert not list((ROOT / "kernels").glob("__init__.*")) and not list((ROOT / "csrc").glob("__init__.*"))


def test_no_installed_distribution_provides_our_regular_packages():
    provided = importlib.metadata.packages_distributions()
    ours = {"ptpeft_fast", "ptpeft-fast"}
    for name in REGULAR_PACKAGES:
        others = [d for d in provided.get(name, []) if d.lower().replace("_", "-") not in ours]
        assert not others, f"top-level {name!r} is also provided by {others}: rename ours"


def test_triton_sources_refuse_to_load_as_a_top_level_kernels_module():
    spec = importlib.util.spec_from_file_location("kernels._common", ROOT / "kernels" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="import it as 'ptpeft_fast.kernels'"):
        spec.loader.exec_module(module)


# Run from the checkout root with the checkout first on sys.path: `kernels` must be the installed
# package, transformers must import (>= 5.25 imports `kernels` at `transformers.activations`), the
# Triton ops must load from our sources, and the README's main job must run (the embedded demo,
# shrunk to seconds as tests/test_train_demo.py shrinks it) exactly as `python -m` runs it.
CHECKOUT_ROOT_RUN = r'''
import os, runpy, sys
from pathlib import Path
root, out, hf = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3] == "1"
assert Path(sys.path[0] or ".").resolve() == root, sys.path[:2]
import transformers.activations
import kernels
assert kernels.__file__ and Path(kernels.__file__).resolve().parent != root / "kernels", kernels.__file__
if hf:
    from transformers.integrations import hub_kernels  # the import that failed in issue 30
else:
    assert kernels.STAND_IN
import ptpeft_fast, ptpeft_fast.ops.triton_ops
import ptpeft_fast.kernels.lora as lora
assert Path(lora.__file__).resolve() == root / "kernels" / "lora.py", lora.__file__
from ptpeft_fast.train import pretrain
pretrain.RECIPES["quick"] = {"n_train": 16, "steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 0}
small = ["data.train.n=24", "data.val.n=3", "stage1.max_steps=2", "stage2.max_steps=2", "stage1.batch_size=8",
         "stage2.batch_size=8", "eval.spectrum_samples=6", "eval.batch_size=16", "train.progress=false",
         "stage1.prefix.num_tokens=4", "stage1.prefix.hidden_size=32"]
sys.argv = ["ptpeft_fast.train", "--quick", "--output", out] + [a for s in small for a in ("--set", s)]
try:
    runpy.run_module("ptpeft_fast.train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
assert (Path(out) / "results.md").is_file()
print("ok")
'''


def test_commands_from_the_checkout_root_use_the_installed_kernels_package(tmp_path):
    hf = _hf_kernels_installed()
    path = [str(ROOT)]
    if not hf:  # a regular package `kernels` installed after the checkout on sys.path
        stand_in = tmp_path / "site" / "kernels"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text("STAND_IN = True\n")
        path.append(str(stand_in.parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PTPEFT_FAST_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", CHECKOUT_ROOT_RUN, str(ROOT), str(tmp_path / "demo"), str(int(hf))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]
