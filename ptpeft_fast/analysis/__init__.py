"""Representation-space analysis: singular-value spectra of features (design §1).

    from ptpeft_fast.analysis import extract_features, SpectrumAccumulator, compare, plot
"""
from .features import FeatureBatch, extract_features, find_layers
from .report import ComparisonTable, compare, plot, spectrum_figure
from .spectrum import SpectrumAccumulator, SpectrumStats, singular_values, spectrum_stats

__all__ = [
    "ComparisonTable",
    "FeatureBatch",
    "SpectrumAccumulator",
    "SpectrumStats",
    "compare",
    "extract_features",
    "find_layers",
    "plot",
    "singular_values",
    "spectrum_figure",
    "spectrum_stats",
]
