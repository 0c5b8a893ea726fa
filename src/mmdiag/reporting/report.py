"""Write a method's summary, statistics and paper-style tables from its fold results.

Side effects: writes ``summary.tsv`` (every variant), ``stats.tsv`` (every table's tests) and
``tables/{name}.md`` / ``.tex`` / ``.html`` for every table of the method's config, each atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmdiag.io import atomic_path, read_tsv, write_tsv
from mmdiag.reporting.compare import FOLD_TESTS, STATS_COLUMNS, compare_to_reference
from mmdiag.reporting.tables import render_html, render_latex, render_markdown, summarise_folds

DEFAULT_TABLE = {
    "title": "Comparison of variants",
    "reference": None,
    "metrics": ["ACC", "AUC", "PRE", "REC", "SPE", "F1"],
    "scale": 100,
    "digits": 2,
    "labels": {},
}


#: The renderings of every table, in the order they are written.
TABLE_FORMATS = ("md", "tex", "html")


def method_tables(method_settings: Mapping) -> dict[str, dict]:
    """The configured tables, or one table of every variant when none is configured."""
    tables = method_settings.get("tables") or {"all": {"rows": list(method_settings["variants"])}}
    return {name: DEFAULT_TABLE | dict(table) for name, table in tables.items()}


def table_paths(out_dir: Path, method_settings: Mapping) -> list[Path]:
    """Every file :func:`write_method_tables` writes, in order."""
    names = list(method_tables(method_settings))
    tables = [out_dir / "tables" / f"{n}.{ext}" for n in names for ext in TABLE_FORMATS]
    return [out_dir / "summary.tsv", out_dir / "stats.tsv", *tables]


def write_method_tables(
    fold_all_path: Path,
    prediction_paths: Sequence[Path],
    method_settings: Mapping,
    *,
    out_dir: Path,
) -> list[Path]:
    """Summarise, compare each table's rows with its reference and render; return the paths."""
    fold_all = read_tsv(fold_all_path)
    stats_settings = method_settings["stats"]
    tests = list(stats_settings["tests"])
    predictions = None
    if set(tests) - set(FOLD_TESTS):
        if not prediction_paths:
            raise ValueError(f"tests {tests} need the variants' predictions.tsv files")
        predictions = pd.concat([read_tsv(p) for p in prediction_paths], ignore_index=True)
    summary = summarise_folds(fold_all)
    out_dir = Path(out_dir)
    paths = table_paths(out_dir, method_settings)
    all_stats, rendered = [], []
    for name, table in method_tables(method_settings).items():
        reference = table["reference"] or method_settings["reference"]
        rows = list(table["rows"])
        missing = sorted(set(rows) - set(fold_all["variant"]))
        if missing:
            raise ValueError(f"table {name!r}: variants {missing} are not in {fold_all_path}")
        stats = compare_to_reference(
            fold_all[fold_all["variant"].isin(rows)],
            None if predictions is None else predictions[predictions["variant"].isin(rows)],
            reference=reference,
            tests=tests,
            metric=stats_settings["metric"],
            n_boot=stats_settings["n_boot"],
            seed=stats_settings["seed"],
        )
        all_stats.append(stats.assign(table=name))
        table_summary = _in_row_order(summary[summary["variant"].isin(rows)], rows)
        options = dict(
            title=table["title"],
            metrics=table["metrics"],
            reference=reference,
            test=tests[0],
            scale=table["scale"],
            digits=table["digits"],
            labels=table["labels"],
        )
        rendered += [
            render_markdown(table_summary, stats, **options),
            render_latex(table_summary, stats, **options),
            render_html(table_summary, stats, **options),
        ]
    write_tsv(summary, paths[0])
    write_tsv(pd.concat(all_stats, ignore_index=True)[["table", *STATS_COLUMNS]], paths[1])
    for path, text in zip(paths[2:], rendered, strict=True):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths


def _in_row_order(summary: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """Summary rows in the table's row order."""
    rank = summary["variant"].map({v: i for i, v in enumerate(rows)})
    return summary.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank")
