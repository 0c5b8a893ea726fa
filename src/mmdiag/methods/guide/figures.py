"""DeepGuide's figures from its fold results (``methods.<name>.figures``).

- ``improvement``: the supplement's Fig. 1 and Table 1's row 6: the relative change (%) of
  the mean balanced accuracy and micro F1 over the splits of each guided variant (G(I) + I)
  over its inferior baseline (I), one pair of bars per column (MR sequence). Written as
  ``improvement.png`` and, as numbers, ``improvement.tsv``.
- ``confusion``: confusion matrices of variants, test patients pooled over the splits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmdiag.io import read_tsv, write_tsv  # noqa: E402
from mmdiag.reporting import figures  # noqa: E402

#: The metrics of Table 1's Δ row and the supplement's Fig. 1.
IMPROVEMENT_METRICS = {"BACC": "BA", "microF1": "F1 (micro)"}


def write_guide_figures(
    *, method: str, method_settings: Mapping, results_dir: Path, out_dir: Path
) -> list[Path]:
    """Write every configured figure of the method in ``out_dir``; return the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = method_settings["figures"]
    labels = _labels(method_settings)
    written = []
    if spec["improvement"]:
        fold_all = read_tsv(Path(results_dir) / "fold_all.tsv")
        table = improvement_table(fold_all, spec["improvement"])
        write_tsv(table, out_dir / "improvement.tsv")
        written.append(plot_improvement(table, out_dir / "improvement.png", method=method))
    for variant in spec["confusion"]:
        written.append(
            figures.plot_confusion(
                figures.variant_predictions(results_dir, variant),
                out_dir / f"confusion_{variant}.png",
                title=labels.get(variant, variant),
                unit="test patients over the splits",
            )
        )
    return written


def improvement_table(fold_all: pd.DataFrame, columns: Mapping[str, Mapping]) -> pd.DataFrame:
    """Per column and metric, the mean over splits of I and of G(I) + I and the relative
    change ``100 (guided - baseline) / baseline`` (Table 1, row 6)."""
    rows = []
    for column, pair in columns.items():
        for metric in IMPROVEMENT_METRICS:
            means = {}
            for role in ("baseline", "guided"):
                values = fold_all[
                    (fold_all["variant"] == pair[role]) & (fold_all["metric"] == metric)
                ]
                if values.empty:
                    raise ValueError(f"fold_all.tsv has no {metric} of variant {pair[role]!r}")
                means[role] = float(values["value"].mean())
            change = 100.0 * (means["guided"] - means["baseline"]) / means["baseline"]
            rows.append({"column": column, "metric": metric, **means, "change_percent": change})
    return pd.DataFrame(rows)


def plot_improvement(table: pd.DataFrame, path: Path, *, method: str) -> Path:
    """Grouped bars of the relative change per column, one bar per metric."""
    columns = list(dict.fromkeys(table["column"]))
    width = 0.8 / len(IMPROVEMENT_METRICS)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(columns), 3.2))
    for offset, (metric, label) in enumerate(IMPROVEMENT_METRICS.items()):
        values = [
            float(
                table[(table["column"] == c) & (table["metric"] == metric)]["change_percent"].iloc[
                    0
                ]
            )
            for c in columns
        ]
        positions = (
            np.arange(len(columns)) + (offset - 0.5 * (len(IMPROVEMENT_METRICS) - 1)) * width
        )
        ax.bar(positions, values, width, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(columns)), columns)
    ax.set_ylabel("G(I) + I over I (%)")
    ax.set_title(f"{method}: relative improvement (Table 1, row 6)")
    ax.legend(frameon=False)
    fig.tight_layout()
    return figures._save(fig, path)


def _labels(method_settings: Mapping) -> dict[str, str]:
    labels: dict[str, str] = {}
    for table in method_settings.get("tables", {}).values():
        labels |= table.get("labels", {})
    return labels
