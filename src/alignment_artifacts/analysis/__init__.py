"""Analysis: per-layer artifact statistics, directions, figures and the HTML report."""

from .core import AnalysisResult, analyze, load_result
from .directions import DirectionSet
from .report import write_report

__all__ = ["AnalysisResult", "DirectionSet", "analyze", "load_result", "write_report"]
