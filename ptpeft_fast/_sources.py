"""Where the top-level ``kernels/`` (Triton) and ``csrc/`` (C++/CUDA) sources live.

The repository keeps them at the top level (the product's layout); a wheel ships them inside the
package as ``ptpeft_fast/kernels`` and ``ptpeft_fast/csrc`` (setup.py's ``package_dir``). From a
checkout that is not installed (``PYTHONPATH=<checkout>``, as on a GPU machine without a package
registry) the package is ``<checkout>/ptpeft_fast`` and the sources are its siblings: a finder
for exactly ``ptpeft_fast.kernels`` serves them from there. One copy of every source, whichever
way the package was found.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["source_dir", "install_checkout_finder"]

_PACKAGE = Path(__file__).resolve().parent


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
        root = source_dir("kernels", "__init__.py")
        if root is None:
            return None
        return importlib.util.spec_from_file_location(fullname, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])


def install_checkout_finder() -> None:
    """Put the finder on ``sys.meta_path`` once, unless the package carries its own ``kernels/``."""
    if (_PACKAGE / "kernels" / "__init__.py").is_file():
        return
    if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutKernelsFinder())
