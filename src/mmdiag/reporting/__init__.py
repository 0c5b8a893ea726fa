"""Paper-style tables (Markdown and LaTeX) and statistical comparisons against a reference."""

from mmdiag.reporting.compare import SIGNIFICANCE_LEVEL, TESTS, compare_to_reference
from mmdiag.reporting.tables import render_latex, render_markdown, summarise_folds

__all__ = [
    "SIGNIFICANCE_LEVEL",
    "TESTS",
    "compare_to_reference",
    "render_latex",
    "render_markdown",
    "summarise_folds",
]
