"""Fold summaries and paper-shaped tables: one row per variant, mean ± std per metric.

The best value of each column is bold, and a last column holds the p-value of the comparison
with the reference row, marked ``*`` (p < 0.05) or ``N.S.``; the reference row reads ``Ref.``.
Standard deviations are sample standard deviations over folds (``ddof=1``), and the footnote
says so.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mmdiag.stats.folds import fold_mean_std

SUMMARY_COLUMNS = ["method", "variant", "metric", "mean", "std", "n_folds"]


def summarise_folds(fold_all: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) of every variant's metric over folds."""
    rows = []
    for (method, variant, metric), values in fold_all.groupby(
        ["method", "variant", "metric"], sort=False
    )["value"]:
        summary = fold_mean_std(values.to_numpy())
        rows.append((method, variant, metric, summary.mean, summary.std, summary.n))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def format_p_value(p_value: float, mark: str) -> str:
    """``0.005 *``, ``<0.001 *``, ``0.163 N.S.``; ``n/a`` when undefined."""
    if not np.isfinite(p_value):
        return "n/a"
    text = "<0.001" if p_value < 0.001 else f"{p_value:.3f}"
    return f"{text} {mark}"


def _table_cells(
    summary: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    metrics: Sequence[str],
    reference: str,
    test: str,
    scale: float,
    digits: int,
    labels: Mapping[str, str],
) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is_best) cells, variants in summary order."""
    means = summary.pivot(index="variant", columns="metric", values="mean")
    stds = summary.pivot(index="variant", columns="metric", values="std")
    missing = sorted(set(metrics) - set(means.columns))
    if missing:
        raise ValueError(f"metrics {missing} not in the fold results ({sorted(means.columns)})")
    variants = list(dict.fromkeys(summary["variant"]))
    best = {m: means[m].max() for m in metrics}
    p_values = stats[stats["test"] == test].set_index("variant")
    header = ["Variant", *metrics, f"p-value ({test})"]
    rows = []
    for variant in variants:
        cells = [(labels.get(variant, variant), False)]
        for metric in metrics:
            mean, std = means.at[variant, metric], stds.at[variant, metric]
            text = f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
            cells.append((text, bool(np.isclose(mean, best[metric]))))
        if variant == reference:
            cells.append(("Ref.", False))
        elif variant in p_values.index:
            row = p_values.loc[variant]
            cells.append((format_p_value(row["p_value"], row["mark"]), False))
        else:
            cells.append(("", False))
        rows.append(cells)
    return header, rows


#: How each test reads the results, for the footnote.
TEST_READINGS = {
    "paired_ttest": "paired t-test of the per-fold values",
    "wilcoxon": "Wilcoxon signed-rank test of the per-fold values",
    "delong": "DeLong test on the pooled test predictions, each patient once (a patient tested "
    "in several splits with its mean probability)",
    "bootstrap": "stratified bootstrap of the AUC difference on the pooled test predictions, "
    "each patient once (a patient tested in several splits with its mean probability)",
    "mcnemar": "McNemar test of the per-patient correctness, each patient once",
}


def footnote(*, test: str, n_folds: int, scale: float) -> str:
    """What the numbers are, in one sentence for under the table."""
    unit = " in %" if scale == 100 else ""
    reading = TEST_READINGS.get(test, test.replace("_", " "))
    return (
        f"Mean ± sample standard deviation (ddof = 1) over {n_folds} folds{unit}; best in bold. "
        f"p-value: {reading} against the row marked Ref.; * p < 0.05, N.S. not significant."
    )


def render_markdown(summary: pd.DataFrame, stats: pd.DataFrame, *, title: str, **options) -> str:
    """A GitHub-flavoured Markdown table with a caption line and a footnote."""
    header, rows = _table_cells(summary, stats, **options)
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":--" if i == 0 else "--:" for i in range(len(header))) + "|")
    for cells in rows:
        lines.append("| " + " | ".join(f"**{t}**" if bold else t for t, bold in cells) + " |")
    n_folds = int(summary["n_folds"].max())
    lines += ["", footnote(test=options["test"], n_folds=n_folds, scale=options["scale"]), ""]
    return "\n".join(lines)


def _latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("{", r"\{"),
        ("}", r"\}"),
    ):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$").replace("<", r"$<$")


def render_latex(summary: pd.DataFrame, stats: pd.DataFrame, *, title: str, **options) -> str:
    """A booktabs ``table`` environment with the caption and footnote."""
    header, rows = _table_cells(summary, stats, **options)
    n_folds = int(summary["n_folds"].max())
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(title)}}}",
        r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for cells in rows:
        texts = [
            rf"\textbf{{{_latex_escape(t)}}}" if bold else _latex_escape(t) for t, bold in cells
        ]
        lines.append(" & ".join(texts) + r" \\")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\par\smallskip\footnotesize "
        + _latex_escape(footnote(test=options["test"], n_folds=n_folds, scale=options["scale"])),
        r"\end{table}",
        "",
    ]
    return "\n".join(lines)


#: Inline style of the HTML tables (the report shows each in its own frame).
HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em}"
    "table{border-collapse:collapse}caption{font-weight:600;text-align:left;padding:.4em 0}"
    "th,td{padding:.3em .8em;border-bottom:1px solid #ccc;text-align:right}"
    "th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #333}"
    "p.note{color:#444;font-size:.9em;max-width:60em}"
)


def html_table(header: Sequence[str], rows: Sequence[Sequence], caption: str) -> str:
    """An escaped HTML ``<table>``; a cell is its text, or ``(text, bold)``."""

    def cell(value) -> str:
        text, bold = value if isinstance(value, tuple) else (value, False)
        text = html.escape(str(text))
        return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def html_page(title: str, body: str, note: str = "") -> str:
    """A standalone HTML page (the project's table style) around ``body``, with a note under it."""
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>"
        f"{body}{note_html}</body></html>\n"
    )


def render_html(summary: pd.DataFrame, stats: pd.DataFrame, *, title: str, **options) -> str:
    """A standalone HTML page holding the table (caption, bold best cells, footnote), for the
    Snakemake report and for a browser."""
    header, rows = _table_cells(summary, stats, **options)
    n_folds = int(summary["n_folds"].max())
    note = footnote(test=options["test"], n_folds=n_folds, scale=options["scale"])
    return html_page(title, html_table(header, rows, title), note)
