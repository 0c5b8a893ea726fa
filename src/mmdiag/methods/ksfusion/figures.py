"""Subspace fusion's figures from its fold results (``methods.<name>.figures``).

- ``roc``: supplement Fig. S1 (top): one-vs-rest ROC curves of the listed variants, one panel
  per class, mean over the splits, for each classification task (``roc_<task>.png``).
- ``alpha``: supplement Fig. S1 (bottom): the sensitivity to α of eqs. 6-8, the mean ± SD
  over the splits of each task's headline metric (AUC; C-index for survival) of the listed
  variants against their α (``alpha.png``, and ``alpha.tsv`` with the numbers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mmdiag.io import read_tsv, write_tsv
from mmdiag.methods.ksfusion.settings import SURVIVAL, network_options
from mmdiag.reporting import figures

#: The default α of eqs. 6-8 (the paper's best, Section 3.2).
DEFAULT_ALPHA = 0.5


def write_ksfusion_figures(
    *, method: str, method_settings: Mapping, results_dir: Path, out_dir: Path
) -> list[Path]:
    """Write every configured figure of the method in ``out_dir``; return the PNG paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = method_settings.get("figures") or {}
    labels = _labels(method_settings)
    written = []
    tasks = method_settings["outcomes"]
    for task, target in tasks.items():
        if target == SURVIVAL or not spec.get("roc"):
            continue
        models = {labels.get(v, v): task_predictions(results_dir, v, task) for v in spec["roc"]}
        written.append(
            figures.plot_roc_comparison(
                models, out_dir / f"roc_{task}.png", title=f"{method}: {task}, test samples"
            )
        )
    if spec.get("alpha"):
        fold_all = read_tsv(Path(results_dir) / "fold_all.tsv")
        metrics = [headline_metric(task, target) for task, target in tasks.items()]
        settings = {v: ("α", alpha_of(method_settings, v)) for v in spec["alpha"]}
        write_tsv(alpha_table(fold_all, settings, metrics), out_dir / "alpha.tsv")
        written.append(
            figures.plot_metric_by_setting(
                fold_all,
                settings,
                out_dir / "alpha.png",
                metrics=metrics,
                title=f"{method}: sensitivity to α (eqs. 6-8)",
                xlabel="α (weight of the tumour subspace's consistency)",
            )
        )
    return written


def headline_metric(task: str, target: str) -> str:
    return f"{task}/C-index" if target == SURVIVAL else f"{task}/AUC"


def alpha_of(method_settings: Mapping, variant: str) -> float:
    return float(network_options(method_settings, variant).get("alpha", DEFAULT_ALPHA))


def alpha_table(
    fold_all: pd.DataFrame, settings: Mapping[str, tuple[str, float]], metrics: Sequence[str]
) -> pd.DataFrame:
    """Per variant and metric: α, the mean and SD over the splits."""
    rows = []
    for variant, (_, alpha) in settings.items():
        for metric in metrics:
            values = fold_all[(fold_all["variant"] == variant) & (fold_all["metric"] == metric)]
            if values.empty:
                raise ValueError(f"fold_all.tsv has no {metric} of variant {variant!r}")
            rows.append(
                {
                    "variant": variant,
                    "alpha": alpha,
                    "metric": metric,
                    "mean": float(values["value"].mean()),
                    "sd": float(values["value"].std(ddof=1)) if len(values) > 1 else float("nan"),
                }
            )
    return pd.DataFrame(rows).sort_values(["metric", "alpha"], ignore_index=True)


def task_predictions(results_dir: Path, variant: str, task: str) -> pd.DataFrame:
    """A variant's prediction rows of one task over all of its splits, with that task's
    ``prob_<class>`` columns only."""
    frame = figures.variant_predictions(results_dir, variant)
    rows = frame[frame["task"] == task]
    if rows.empty:
        raise ValueError(f"{results_dir}/{variant}: no predictions of task {task!r}")
    return rows.dropna(axis=1, how="all").reset_index(drop=True)


def _labels(method_settings: Mapping) -> dict[str, str]:
    labels: dict[str, str] = {}
    for table in (method_settings.get("tables") or {}).values():
        labels |= table.get("labels", {})
    return labels
