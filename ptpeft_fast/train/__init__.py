"""``python -m ptpeft_fast.train``: two-stage PT-PEFT training and evaluation.

Without arguments it runs the embedded demo (see :mod:`ptpeft_fast.train.demo`); with
``--config FILE`` it runs that config; ``--resume DIR`` continues an interrupted run.
"""
from __future__ import annotations

from .cli import build_parser, main

__all__ = ["main", "build_parser"]
