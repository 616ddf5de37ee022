"""Where the top-level ``kernels/`` (Triton) and ``csrc/`` (C++/CUDA) sources live.

The repository keeps them at the top level (the product's layout); a wheel ships them inside the
package as ``ptpeft_fast/kernels`` and ``ptpeft_fast/csrc`` (setup.py's ``package_dir``). From a
checkout that is not installed (``PYTHONPATH=<checkout>``, as on a GPU machine without a package
registry) the package is ``<checkout>/ptpeft_fast`` and the sources are its siblings: a finder
for exactly ``ptpeft_fast.kernels`` serves them from there. One copy of every source, whichever
way the package was found.

Neither folder has an ``__init__.py``: the checkout root is first on ``sys.path`` for every
``python -m`` and ``pytest`` run there, and a regular package ``kernels`` at that root would shadow
Hugging Face's ``kernels`` (which transformers >= 5.25 imports). ``ptpeft_fast.kernels`` is
therefore a namespace-style package (``__path__`` only, no ``__file__``).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

__all__ = ["KERNELS_MARKER", "source_dir", "install_checkout_finder"]

_PACKAGE = Path(__file__).resolve().parent
#: A file every copy of the Triton sources holds (the folder has no ``__init__.py``).
KERNELS_MARKER = "_common.py"


def source_dir(name: str, marker: str) -> Path | None:
    """``<package>/<name>`` in an installed wheel, else ``<checkout>/<name>``; the first that holds
    ``marker``, or None."""
    for cand in (_PACKAGE / name, _PACKAGE.parent / name):
        if (cand / marker).is_file():
            return cand
    return None


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``ptpeft_fast.kernels`` in the checkout's top-level ``kernels/`` (last on the meta path:
    an installed or editable package is found first)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (the importlib protocol)
        if fullname != "ptpeft_fast.kernels":
            return None
        root = source_dir("kernels", KERNELS_MARKER)
        if root is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(root)]  # a namespace-style package over kernels/
        return spec


def install_checkout_finder() -> None:
    """Put the finder on ``sys.meta_path`` once, unless the package carries its own ``kernels/``."""
    if (_PACKAGE / "kernels" / KERNELS_MARKER).is_file():
        return
    if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutKernelsFinder())
