"""CS-MIL's Table 5: every variant's AUC and AP on the micro- and macro-anomaly toy datasets.

Each cell is the mean over splits of that dataset's method (``results/csmil_micro`` and
``results/csmil_macro``); the last column is the mean of the four numbers, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmdiag.io import atomic_path, read_tsv
from mmdiag.reporting.tables import html_page, html_table

DATASETS = ("Micro-anomaly", "Macro-anomaly")
METRICS = ("AUC", "AP")
TITLE = "Table 5: classification performance on the two toy datasets"
TITLE_NOTE = "mean over splits"


def toy_table(
    fold_alls: Mapping[str, pd.DataFrame], rows: Sequence[str], labels: Mapping[str, str]
) -> pd.DataFrame:
    """Rows = variants; columns = (dataset, metric) means over splits, and their mean."""
    columns = {}
    for dataset, fold_all in fold_alls.items():
        means = fold_all.groupby(["variant", "metric"])["value"].mean()
        for metric in METRICS:
            columns[f"{dataset} {metric}"] = [means.get((v, metric), float("nan")) for v in rows]
    table = pd.DataFrame(columns, index=[labels.get(v, v) for v in rows])
    table["Mean"] = table.mean(axis=1)
    table.index.name = "Method"
    return table


def render_toy_markdown(table: pd.DataFrame, *, reference_label: str, digits: int = 4) -> str:
    """A Markdown table with the best mean in bold and the reference row marked."""
    best = table["Mean"].max()
    header = "| " + " | ".join([table.index.name, *table.columns]) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for name, row in table.iterrows():
        cells = [f"{value:.{digits}f}" for value in row]
        if row["Mean"] == best:
            cells[-1] = f"**{cells[-1]}**"
        marker = " (Ref.)" if name == reference_label else ""
        lines.append("| " + " | ".join([f"{name}{marker}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def render_toy_latex(table: pd.DataFrame, *, digits: int = 4) -> str:
    """The same table as a LaTeX tabular (booktabs)."""
    spec = "l" + "c" * len(table.columns)
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(["Method", *table.columns]) + r" \\",
        r"\midrule",
    ]
    for name, row in table.iterrows():
        lines.append(" & ".join([str(name), *(f"{v:.{digits}f}" for v in row)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines).replace("_", r"\_") + "\n"


def render_toy_html(table: pd.DataFrame, *, reference_label: str, digits: int = 4) -> str:
    """The same table as a standalone HTML page (for the report), best mean in bold."""
    best = table["Mean"].max()
    rows = []
    for name, row in table.iterrows():
        cells = [f"{value:.{digits}f}" for value in row]
        marker = " (Ref.)" if name == reference_label else ""
        rows.append([f"{name}{marker}", *cells[:-1], (cells[-1], bool(row["Mean"] == best))])
    header = [table.index.name, *table.columns]
    return html_page(TITLE, html_table(header, rows, f"{TITLE} ({TITLE_NOTE})"))


def write_toy_table(
    micro_fold_all: Path,
    macro_fold_all: Path,
    method_settings: Mapping,
    out_dir: Path,
) -> list[Path]:
    """``table5.md``, ``.tex``, ``.html`` and ``.tsv`` under ``out_dir``; return the paths."""
    fold_alls = {
        DATASETS[0]: read_tsv(micro_fold_all),
        DATASETS[1]: read_tsv(macro_fold_all),
    }
    labels = {}
    for table in method_settings.get("tables", {}).values():
        labels |= table.get("labels", {})
    rows = list(method_settings["variants"])
    table = toy_table(fold_alls, rows, labels)
    reference = labels.get(method_settings["reference"], method_settings["reference"])
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "table5.md": f"{TITLE} ({TITLE_NOTE})\n\n"
        + render_toy_markdown(table, reference_label=reference),
        "table5.tex": render_toy_latex(table),
        "table5.html": render_toy_html(table, reference_label=reference),
        "table5.tsv": table.reset_index().to_csv(sep="\t", index=False),
    }
    written = []
    for name, text in outputs.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text)
        written.append(out_dir / name)
    return written
