"""Analysis: per-layer artifact statistics, directions, figures and the HTML report."""

from .core import analyze
from .directions import DirectionSet
from .report import write_report
from .result import AnalysisResult, load_result

__all__ = ["AnalysisResult", "DirectionSet", "analyze", "load_result", "write_report"]
