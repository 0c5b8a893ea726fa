"""Write a method's summary, statistics and paper-style tables from its fold results.

Side effects: writes ``summary.tsv``, ``stats.tsv``, ``table.md`` and ``table.tex`` into the
output folder, each atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmdiag.io import atomic_path, write_tsv
from mmdiag.reporting.compare import FOLD_TESTS, compare_to_reference
from mmdiag.reporting.tables import render_latex, render_markdown, summarise_folds


def read_tsv_exact(path: str | Path) -> pd.DataFrame:
    """Read a TSV; pandas >= 3 parses 17-digit floats back to the exact doubles written."""
    return pd.read_csv(path, sep="\t")


def write_method_tables(
    fold_all_path: Path,
    prediction_paths: Sequence[Path],
    method_settings: Mapping,
    *,
    out_dir: Path,
) -> list[Path]:
    """Summarise, compare with the reference and render; return the four written paths."""
    fold_all = read_tsv_exact(fold_all_path)
    stats_settings, table_settings = method_settings["stats"], method_settings["table"]
    tests = list(stats_settings["tests"])
    needs_predictions = bool(set(tests) - set(FOLD_TESTS))
    predictions = None
    if needs_predictions:
        if not prediction_paths:
            raise ValueError(f"tests {tests} need the variants' predictions.tsv files")
        predictions = pd.concat([read_tsv_exact(p) for p in prediction_paths], ignore_index=True)
    stats = compare_to_reference(
        fold_all,
        predictions,
        reference=method_settings["reference"],
        tests=tests,
        metric=stats_settings["metric"],
        n_boot=stats_settings["n_boot"],
        seed=stats_settings["seed"],
    )
    summary = _in_config_order(summarise_folds(fold_all), list(method_settings["variants"]))
    options = dict(
        title=table_settings["title"],
        metrics=table_settings["metrics"],
        reference=method_settings["reference"],
        test=tests[0],
        scale=table_settings["scale"],
        digits=table_settings["digits"],
        labels=table_settings["labels"],
    )
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in ("summary.tsv", "stats.tsv", "table.md", "table.tex")]
    write_tsv(summary, paths[0])
    write_tsv(stats, paths[1])
    for path, render in zip(paths[2:], (render_markdown, render_latex), strict=True):
        with atomic_path(path) as tmp:
            tmp.write_text(render(summary, stats, **options))
    return paths


def _in_config_order(summary: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """Rows in the order the config lists the variants (others after them, as found)."""
    found = list(dict.fromkeys(summary["variant"]))
    order = [v for v in variants if v in found] + [v for v in found if v not in variants]
    rank = summary["variant"].map({v: i for i, v in enumerate(order)})
    return summary.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank")
