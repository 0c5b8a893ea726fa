"""Figures from result tables: ROC curves, confusion matrices, and CMUS-Net's Figs. 4, 5, 6 and 8.

Paper: K. Long et al., "Cross-modal ultra-scale learning with tri-modalities of renal biopsy
images for glomerular multi-disease auxiliary diagnosis", Medical Image Analysis, 2025.

Inputs are the pipeline's tables: ``predictions`` (rows of ``predictions.tsv`` of one variant,
all folds: ``patient_id, fold, variant, y_true, y_pred, prob_<class>...``, class names in the
order of the ``prob_`` columns) and ``fold_all`` (``method, variant, fold, metric, value`` with
metrics as fractions). Every plot function validates its input, raising ``ValueError`` that
names the argument, and writes one 150 dpi PNG atomically (side effect: the file at ``path``).
The numbers behind the ROC and confusion plots come from :func:`roc_curves` and
:func:`confusion_counts`, which are tested against scikit-learn.

Means and standard deviations over folds are sample standard deviations (``ddof=1``), as in the
result tables.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from mmdiag.io.atomic import atomic_path  # noqa: E402

DPI = 150
PROB_PREFIX = "prob_"
PREDICTION_COLUMNS = ("fold", "y_true", "y_pred")
FOLD_ALL_COLUMNS = ("variant", "fold", "metric", "value")
ROC_GRID_POINTS = 101
WEIGHT_SUM_TOLERANCE = 1e-6
CAM_ALPHA = 0.45
CAM_CMAP = "turbo"
_COLOURS = plt.get_cmap("tab10").colors  # colour-blind-safe categorical palette
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


# ----------------------------------------------------------------------------- validation


def _check_frame(frame: object, name: str, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{name} is empty")
    return frame


def class_names(predictions: pd.DataFrame) -> list[str]:
    """Class names from the ``prob_<class>`` columns, in column order (class index order)."""
    names = [c[len(PROB_PREFIX) :] for c in predictions.columns if str(c).startswith(PROB_PREFIX)]
    if len(names) < 2:
        raise ValueError(
            f"predictions needs a prob_<class> column per class (at least 2), "
            f"got columns {list(predictions.columns)}"
        )
    return names


def _check_predictions(predictions: object) -> tuple[pd.DataFrame, list[str]]:
    frame = _check_frame(predictions, "predictions", PREDICTION_COLUMNS)
    classes = class_names(frame)
    for column in ("y_true", "y_pred"):
        values = frame[column].to_numpy()
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                f"predictions.{column} must hold integer class indices, got {values.dtype}"
            )
        bad = values[(values < 0) | (values >= len(classes))]
        if bad.size:
            raise ValueError(
                f"predictions.{column} must lie in 0..{len(classes) - 1} "
                f"(classes {classes}), got {sorted(set(bad.tolist()))}"
            )
    probs = frame[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=float)
    if not np.isfinite(probs).all():
        raise ValueError("predictions' prob_ columns contain NaN or infinite values")
    return frame, classes


def variant_predictions(
    results_dir: str | Path, variant: str, name: str = "predictions.tsv"
) -> pd.DataFrame:
    """A variant's rows of ``name`` (``predictions.tsv``) over all of its folds;
    ``FileNotFoundError`` naming the folder when no fold has it."""
    from mmdiag.io import read_tsv

    paths = sorted(Path(results_dir, variant).glob(f"fold_*/{name}"))
    if not paths:
        raise FileNotFoundError(f"{results_dir}/{variant}: no fold has {name}")
    return pd.concat([read_tsv(p) for p in paths], ignore_index=True)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- ROC


@dataclass(frozen=True)
class ClassRoc:
    """One-vs-rest ROC of one class over folds.

    ``fold_curves`` maps fold -> (fpr, tpr) as scikit-learn's ``roc_curve`` returns them;
    ``fold_auc`` maps fold -> AUC; folds without positives or negatives of the class are left
    out. ``mean_tpr`` and ``sd_tpr`` are the vertical average over folds on ``fpr_grid``.
    """

    name: str
    fpr_grid: np.ndarray
    fold_curves: dict[int, tuple[np.ndarray, np.ndarray]]
    fold_auc: dict[int, float]
    mean_tpr: np.ndarray
    sd_tpr: np.ndarray
    auc_mean: float
    auc_sd: float


def _tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A ROC curve's TPR at each grid FPR: linear between its points, the upper value at a
    vertical step (several points share one FPR), and 0 at FPR = 0 (the curve's start)."""
    last = np.searchsorted(fpr, grid, side="right") - 1  # last point with fpr <= x
    nxt = np.minimum(last + 1, fpr.size - 1)
    span = fpr[nxt] - fpr[last]
    frac = np.divide(grid - fpr[last], span, out=np.zeros_like(grid), where=span > 0)
    values = tpr[last] + frac * (tpr[nxt] - tpr[last])
    values[grid == 0] = 0.0
    return values


def _sample_sd(values: np.ndarray, axis: int = 0) -> np.ndarray:
    if values.shape[axis] < 2:
        return np.full(np.delete(values.shape, axis), np.nan)
    return np.std(values, axis=axis, ddof=1)


def roc_curves(predictions: pd.DataFrame) -> dict[str, ClassRoc]:
    """Per-class one-vs-rest ROC curves per fold and their vertical average.

    Parameters
    ----------
    predictions
        Prediction rows of one variant, all folds (see the module docstring).

    Returns
    -------
    dict of str to ClassRoc
        Keyed by class name in class-index order.

    Notes
    -----
    For class k the score is ``prob_<k>`` and the positives are ``y_true == k``. Each fold's TPR
    is read off on a grid of 101 FPR values in [0, 1] (vertical averaging, Fawcett 2006, sec. 7),
    then ``mean_tpr = mean_f TPR_f`` and ``sd_tpr`` the sample SD over folds. A fold where the
    class has no positives (or no negatives) has no ROC curve: it is skipped with a warning.
    ``auc_mean`` and ``auc_sd`` summarise ``roc_auc_score`` over the remaining folds (``nan``
    when none remain).

    References
    ----------
    T. Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27:861-874, 2006.
    """
    frame, classes = _check_predictions(predictions)
    grid = np.linspace(0.0, 1.0, ROC_GRID_POINTS)
    result = {}
    for k, name in enumerate(classes):
        curves, aucs, grid_tprs, skipped = {}, {}, [], []
        for fold, rows in frame.groupby("fold", sort=True):
            positive = rows["y_true"].to_numpy() == k
            if positive.all() or not positive.any():
                skipped.append(fold)
                continue
            score = rows[PROB_PREFIX + name].to_numpy(dtype=float)
            fpr, tpr, _ = roc_curve(positive, score)
            curves[int(fold)] = (fpr, tpr)
            aucs[int(fold)] = float(roc_auc_score(positive, score))
            grid_tprs.append(_tpr_on_grid(fpr, tpr, grid))
        if skipped:
            warnings.warn(
                f"class {name!r} has no positives or no negatives in folds {skipped}; "
                f"their ROC curves are left out",
                UserWarning,
                stacklevel=2,
            )
        if grid_tprs:
            stacked = np.vstack(grid_tprs)
            mean_tpr, sd_tpr = stacked.mean(axis=0), _sample_sd(stacked)
            auc_values = np.array(list(aucs.values()))
            auc_mean, auc_sd = float(auc_values.mean()), float(_sample_sd(auc_values))
        else:
            mean_tpr = sd_tpr = np.full_like(grid, np.nan)
            auc_mean = auc_sd = float("nan")
        result[name] = ClassRoc(name, grid, curves, aucs, mean_tpr, sd_tpr, auc_mean, auc_sd)
    return result


def plot_roc_per_class(predictions: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """One-vs-rest ROC per class: thin fold curves, bold mean curve, ±1 SD band, AUC mean ± SD.

    One panel per class; the numbers come from :func:`roc_curves`. Writes the PNG at ``path``.
    """
    rocs = roc_curves(predictions)
    n = len(rocs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False, layout="constrained")
    for k, (ax, roc) in enumerate(zip(axes[0], rocs.values(), strict=True)):
        colour = _COLOURS[k % len(_COLOURS)]
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.5", label="chance")
        for i, (fpr, tpr) in enumerate(roc.fold_curves.values()):
            label = f"folds (n = {len(roc.fold_curves)})" if i == 0 else None
            ax.plot(fpr, tpr, lw=0.8, alpha=0.45, color=colour, label=label)
        if roc.fold_curves:
            if np.isfinite(roc.sd_tpr).all():
                ax.fill_between(
                    roc.fpr_grid,
                    np.clip(roc.mean_tpr - roc.sd_tpr, 0, 1),
                    np.clip(roc.mean_tpr + roc.sd_tpr, 0, 1),
                    color=colour,
                    alpha=0.18,
                    lw=0,
                    label="±1 SD",
                )
            sd_text = f" ± {roc.auc_sd:.3f}" if np.isfinite(roc.auc_sd) else ""
            ax.plot(
                roc.fpr_grid,
                roc.mean_tpr,
                lw=2.4,
                color=colour,
                label=f"mean (AUC = {roc.auc_mean:.3f}{sd_text})",
            )
        else:
            ax.text(0.5, 0.5, "no fold has\npositives and negatives", ha="center", va="center")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_title(f"{roc.name} vs rest")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc_comparison(
    models: Mapping[str, pd.DataFrame], path: str | Path, *, title: str, columns: int = 4
) -> Path:
    """One-vs-rest ROC per class with one mean curve per model (MHD-Net Fig. 5).

    ``models`` maps a legend label to that model's prediction rows (all folds, the same
    classes); each panel is one class, each curve the model's mean over folds
    (:func:`roc_curves`), its AUC mean in the legend. Writes the PNG at ``path``.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty mapping label -> predictions, got {models!r}")
    rocs = {label: roc_curves(frame) for label, frame in models.items()}
    classes = list(next(iter(rocs.values())))
    for label, curves in rocs.items():
        if list(curves) != classes:
            raise ValueError(f"models[{label!r}] has classes {list(curves)}, expected {classes}")
    n_rows = -(-len(classes) // columns)
    n_cols = min(columns, len(classes))
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.6 * n_cols, 3.7 * n_rows), squeeze=False, layout="constrained"
    )
    for index, ax in enumerate(axes.flat):
        if index >= len(classes):
            ax.axis("off")
            continue
        name = classes[index]
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.5", label="chance (0.50)")
        for m, (label, curves) in enumerate(rocs.items()):
            roc = curves[name]
            if roc.fold_curves:
                ax.plot(
                    roc.fpr_grid,
                    roc.mean_tpr,
                    lw=1.8,
                    color=_COLOURS[m % len(_COLOURS)],
                    label=f"{label} ({roc.auc_mean:.2f})",
                )
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_title(f"{name} vs rest")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7, title="AUC", title_fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_parameter_counts(counts: Mapping[str, int], path: str | Path, *, title: str) -> Path:
    """Horizontal bars of parameter counts in millions (MHD-Net Fig. 7, right)."""
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError(f"counts must be a non-empty mapping label -> parameters, got {counts!r}")
    labels = list(counts)
    millions = np.array([counts[label] for label in labels], dtype=float) / 1e6
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(labels) + 1.4), layout="constrained")
    bars = ax.barh(labels, millions, color=_COLOURS[0])
    ax.bar_label(bars, [f"{m:.3g} M" for m in millions], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("Parameters (millions)")
    ax.set_xlim(0, 1.25 * millions.max())
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- confusion


def confusion_counts(predictions: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Confusion matrix pooled over folds: ``counts[i, j]`` = rows with true i, predicted j.

    Returns the (K, K) integer counts and the class names (from the ``prob_`` columns).
    """
    frame, classes = _check_predictions(predictions)
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (frame["y_true"].to_numpy(), frame["y_pred"].to_numpy()), 1)
    return counts, classes


def plot_confusion(
    predictions: pd.DataFrame,
    path: str | Path,
    *,
    title: str,
    normalise: bool = False,
    unit: str = "patients",
) -> Path:
    """Confusion matrix pooled over folds, counts in the cells.

    With ``normalise`` the colour is the row fraction (recall per true class) and each cell also
    shows its row percentage. ``unit`` names what a row of ``predictions`` is (patients, CT
    sequences ...). Writes the PNG at ``path``.
    """
    counts, classes = confusion_counts(predictions)
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    shown = fractions if normalise else counts
    k = len(classes)
    size = max(4.0, 1.1 * k + 2.2)
    fig, ax = plt.subplots(figsize=(size + 0.8, size), layout="constrained")
    vmax = 1.0 if normalise else max(int(counts.max()), 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
    cbar = fig.colorbar(image, ax=ax, shrink=0.8)
    cbar.set_label("fraction of true class" if normalise else unit)
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}"
            if normalise:
                text += f"\n({100 * fractions[i, j]:.1f}%)"
            colour = "white" if shown[i, j] > 0.55 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=11)
    ax.set_xticks(range(k), classes)
    labels = [f"{c}\n(n = {n})" for c, n in zip(classes, row_totals[:, 0], strict=True)]
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    n_folds = predictions["fold"].nunique()
    ax.set_title(f"{title}\n({int(counts.sum())} {unit}, {n_folds} folds pooled)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- fold metrics


def _check_fold_all(fold_all: object, metrics: Sequence[str]) -> pd.DataFrame:
    frame = _check_frame(fold_all, "fold_all", FOLD_ALL_COLUMNS)
    if isinstance(metrics, str) or not len(metrics):
        raise ValueError(f"metrics must be a non-empty sequence of names, got {metrics!r}")
    absent = [m for m in metrics if m not in set(frame["metric"])]
    if absent:
        raise ValueError(
            f"metrics {absent} are not in fold_all (it has {sorted(set(frame['metric']))})"
        )
    return frame


def _fold_summary(frame: pd.DataFrame, variants: Sequence[str], metric: str) -> pd.DataFrame:
    """Mean, sample SD and fold count of ``metric`` per variant (index: variant)."""
    absent = [v for v in variants if v not in set(frame["variant"])]
    if absent:
        raise ValueError(
            f"variants {absent} are not in fold_all (it has {sorted(set(frame['variant']))})"
        )
    rows = frame[(frame["metric"] == metric) & frame["variant"].isin(list(variants))]
    duplicated = rows.duplicated(["variant", "fold"])
    if duplicated.any():
        twice = sorted(set(rows.loc[duplicated, "variant"]))
        raise ValueError(
            f"fold_all has several {metric} rows per fold for variants {twice} "
            f"(several methods?); filter fold_all to one method first"
        )
    missing = [v for v in variants if v not in set(rows["variant"])]
    if missing:
        raise ValueError(f"fold_all has no {metric} rows for variants {missing}")
    grouped = rows.groupby("variant")["value"]
    return pd.DataFrame(
        {"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.count()}
    ).loc[list(variants)]


def plot_metric_by_setting(
    fold_all: pd.DataFrame,
    settings: Mapping[str, tuple[str, float]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("ACC", "AUC"),
    title: str,
    xlabel: str,
) -> Path:
    """Metric against a setting (paper Fig. 5): a line per series, mean ± SD over folds.

    ``settings`` maps variant -> (series name, x value), e.g. ``{"cmus_net_bs2": ("CMUS-Net",
    2), "late_vote_bs2": ("late fusion (vote)", 2)}``. One panel per metric; values in percent.
    Writes the PNG at ``path``.
    """
    frame = _check_fold_all(fold_all, metrics)
    if not isinstance(settings, Mapping) or not settings:
        raise ValueError(
            f"settings must be a non-empty mapping variant -> (series, x), got {settings!r}"
        )
    series: dict[str, list[tuple[float, str]]] = {}
    for variant, setting in settings.items():
        if not (isinstance(setting, tuple | list) and len(setting) == 2):
            raise ValueError(
                f"settings[{variant!r}] must be (series name, x value), got {setting!r}"
            )
        name, x = setting
        if not np.isfinite(float(x)):
            raise ValueError(f"settings[{variant!r}] has a non-finite x value {x!r}")
        series.setdefault(str(name), []).append((float(x), variant))
    for name, points in series.items():
        xs = [x for x, _ in points]
        if len(set(xs)) != len(xs):
            raise ValueError(f"series {name!r} has two variants at the same x value: {points}")
        points.sort()
    all_x = sorted({x for points in series.values() for x, _ in points})
    # series sharing an x value are nudged apart so that their error bars stay readable
    dodge = 0.012 * ((all_x[-1] - all_x[0]) or 1.0)

    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], metrics, strict=True):
        summary = _fold_summary(frame, list(settings), metric)
        for s, (name, points) in enumerate(series.items()):
            xs = [x + (s - (len(series) - 1) / 2) * dodge for x, _ in points]
            stats = summary.loc[[v for _, v in points]]
            ax.errorbar(
                xs,
                100 * stats["mean"].to_numpy(),
                yerr=100 * stats["sd"].fillna(0).to_numpy(),
                color=_COLOURS[s % len(_COLOURS)],
                marker=_MARKERS[s % len(_MARKERS)],
                lw=1.8,
                ms=6,
                capsize=4,
                label=name,
            )
        ax.set_xticks(all_x, [f"{x:g}" for x in all_x])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="best", fontsize=9)
    fig.suptitle(f"{title}\n(mean ± SD over folds)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- loss weights


def _check_weights(weights: object) -> dict[str, tuple[float, float, float]]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"weights must be a non-empty mapping variant -> (alpha, beta, gamma), got {weights!r}"
        )
    checked = {}
    for variant, triple in weights.items():
        values = np.asarray(triple, dtype=float)
        if (
            values.shape != (3,)
            or not np.isfinite(values).all()
            or (values < -WEIGHT_SUM_TOLERANCE).any()
        ):
            raise ValueError(
                f"weights[{variant!r}] must be three finite non-negative numbers "
                f"(alpha, beta, gamma), got {triple!r}"
            )
        if abs(values.sum() - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"weights[{variant!r}] = {tuple(triple)} sums to {values.sum():.8g}, "
                f"not 1 (tolerance {WEIGHT_SUM_TOLERANCE:g})"
            )
        checked[variant] = tuple(float(v) for v in values)
    return checked


def _text_colour(rgba: Sequence[float]) -> str:
    luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def plot_loss_weight_simplex(
    fold_all: pd.DataFrame,
    weights: Mapping[str, tuple[float, float, float]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("ACC", "AUC"),
    title: str,
) -> Path:
    """Metric over the loss-weight simplex (paper Fig. 6) as a heatmap on the (alpha, beta) grid.

    ``weights`` maps variant -> (alpha, beta, gamma), the weights of the OM, IM and TEM losses,
    with alpha + beta + gamma = 1 (within 1e-6), so gamma = 1 - alpha - beta. One panel per
    metric: cell colour and text are the mean over folds (percent), the best cell is outlined,
    grid points without a variant stay blank. Writes the PNG at ``path``.
    """
    frame = _check_fold_all(fold_all, metrics)
    checked = _check_weights(weights)
    # weights like 0.1 + 0.2 are not exact: cells are identified on a rounded grid
    cell_of = {v: (round(a, 6), round(b, 6)) for v, (a, b, _) in checked.items()}
    if len(set(cell_of.values())) != len(cell_of):
        raise ValueError(f"two variants share one (alpha, beta) cell: {cell_of}")
    alphas = sorted({a for a, _ in cell_of.values()})
    betas = sorted({b for _, b in cell_of.values()})

    n = len(metrics)
    side = max(4.2, 0.75 * max(len(alphas), len(betas)) + 2.2)
    fig, axes = plt.subplots(
        1, n, figsize=((side + 1.0) * n, side), squeeze=False, layout="constrained"
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for ax, metric in zip(axes[0], metrics, strict=True):
        summary = _fold_summary(frame, list(checked), metric)
        grid = np.full((len(betas), len(alphas)), np.nan)
        for variant, (a, b) in cell_of.items():
            grid[betas.index(b), alphas.index(a)] = 100 * summary.loc[variant, "mean"]
        finite = grid[np.isfinite(grid)]
        image = ax.imshow(
            np.ma.masked_invalid(grid),
            origin="lower",
            cmap=cmap,
            vmin=finite.min(),
            vmax=finite.max() if finite.max() > finite.min() else finite.min() + 1,
        )
        cbar = fig.colorbar(image, ax=ax, shrink=0.85)
        cbar.set_label(f"mean {metric} (%)")
        for i in range(len(betas)):
            for j in range(len(alphas)):
                if np.isfinite(grid[i, j]):
                    colour = _text_colour(image.cmap(image.norm(grid[i, j])))
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color=colour)
        best_i, best_j = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(
            Rectangle((best_j - 0.5, best_i - 0.5), 1, 1, fill=False, ec="red", lw=2.5, zorder=3)
        )
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_xlabel("α (OM weight)")
        ax.set_ylabel("β (IM weight)")
        a_best, b_best = alphas[best_j], betas[best_i]
        ax.set_title(
            f"{metric}: best {grid[best_i, best_j]:.1f} at "
            f"α={a_best:g}, β={b_best:g}, γ={1 - a_best - b_best:g}",
            fontsize=10,
        )
    fig.suptitle(f"{title}\nTEM weight γ = 1 − α − β; cells: mean over folds, best outlined in red")
    return _save(fig, path)


# ----------------------------------------------------------------------------- t-SNE


def _check_labels(labels: object, classes: Sequence[str], n: int | None) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {array.dtype} {array.shape}")
    if n is not None and array.size != n:
        raise ValueError(f"labels has {array.size} entries but the features have {n} rows")
    if isinstance(classes, str) or not len(classes):
        raise ValueError(f"classes must be a non-empty sequence of names, got {classes!r}")
    bad = array[(array < 0) | (array >= len(classes))]
    if bad.size:
        raise ValueError(
            f"labels must lie in 0..{len(classes) - 1}, got {sorted(set(bad.tolist()))}"
        )
    return array


def tsne_embedding(features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-d t-SNE of (n, d) ``features``: perplexity min(30, (n - 1) / 3), PCA initialisation."""
    array = np.asarray(features, dtype=float)
    if array.ndim != 2 or array.shape[0] < 4:
        raise ValueError(f"features must be an (n, d) array with n >= 4, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinite values")
    n = array.shape[0]
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
    return tsne.fit_transform(array)


def plot_tsne(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    *,
    title: str,
    seed: int = 0,
) -> Path:
    """t-SNE of each modality's features (paper Fig. 4), points coloured by class.

    ``features`` maps a panel name (``"OM"``, ``"IM"``, ``"TEM"``, ``"fusion"``) to (n, d)
    features of the same n patients, whose classes are ``labels`` (indices into ``classes``).
    Writes the PNG at ``path``.
    """
    if not isinstance(features, Mapping) or not features:
        raise ValueError(
            f"features must be a non-empty mapping name -> (n, d) array, got {features!r}"
        )
    shapes = {name: np.shape(f) for name, f in features.items()}
    n_rows = {s[0] for s in shapes.values() if len(s) == 2}
    if len(n_rows) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"every features entry must be (n, d) with the same n, got {shapes}")
    labels = _check_labels(labels, classes, n_rows.pop())
    embeddings = {name: tsne_embedding(f, seed=seed) for name, f in features.items()}

    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 4.5), squeeze=False, layout="constrained")
    for ax, (name, embedding) in zip(axes[0], embeddings.items(), strict=True):
        for k, class_name in enumerate(classes):
            chosen = labels == k
            ax.scatter(
                embedding[chosen, 0],
                embedding[chosen, 1],
                s=22,
                color=_COLOURS[k % len(_COLOURS)],
                marker=_MARKERS[k % len(_MARKERS)],
                alpha=0.85,
                edgecolors="white",
                linewidths=0.4,
                label=f"{class_name} (n = {int(chosen.sum())})",
            )
        ax.set_title(name)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(classes), title="class")
    fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------- Grad-CAM


def upsample_cam(cam: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a (h, w) CAM to ``size_px`` = (H, W), clipped to [0, 1]."""
    array = np.asarray(cam, dtype=np.float32)
    height_px, width_px = size_px
    resized = Image.fromarray(array).resize((width_px, height_px), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=float), 0.0, 1.0)


def _check_cam_inputs(images: object, cams: object) -> None:
    for name, value in (("images", images), ("cams", cams)):
        if not isinstance(value, Mapping) or not value:
            raise ValueError(f"{name} must be a non-empty mapping modality -> array")
    if list(images) != list(cams):
        raise ValueError(
            f"images and cams need the same modalities, got {list(images)} and {list(cams)}"
        )
    for modality in images:
        image, cam = np.asarray(images[modality]), np.asarray(cams[modality])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"images[{modality!r}] must be (H, W, 3) uint8, got {image.dtype} {image.shape}"
            )
        if cam.ndim != 2 or not np.issubdtype(cam.dtype, np.floating):
            raise ValueError(
                f"cams[{modality!r}] must be a (h, w) float array, got {cam.dtype} {cam.shape}"
            )
        if not np.isfinite(cam).all() or cam.min() < 0 or cam.max() > 1:
            raise ValueError(f"cams[{modality!r}] must hold finite values in [0, 1]")


def plot_grad_cam(
    images: Mapping[str, np.ndarray],
    cams: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """Grad-CAM maps over their images (paper Fig. 8): a column per modality.

    Top row the (H, W, 3) uint8 image, bottom row the image with the (h, w) CAM in [0, 1],
    bilinearly upsampled to (H, W), overlaid in the turbo colormap at alpha 0.45.
    Writes the PNG at ``path``.
    """
    _check_cam_inputs(images, cams)
    n = len(images)
    fig, axes = plt.subplots(
        2, n, figsize=(3.2 * n + 1.0, 6.6), squeeze=False, layout="constrained"
    )
    overlay = None
    for j, modality in enumerate(images):
        image = np.asarray(images[modality])
        cam = upsample_cam(cams[modality], image.shape[:2])
        axes[0, j].imshow(image)
        axes[1, j].imshow(image)
        overlay = axes[1, j].imshow(cam, cmap=CAM_CMAP, alpha=CAM_ALPHA, vmin=0, vmax=1)
        axes[0, j].set_title(modality)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=12)
    axes[1, 0].set_ylabel(f"Grad-CAM overlay (α = {CAM_ALPHA})", fontsize=12)
    # the colour bar shows the opaque colormap, not the half-transparent overlay
    scale = matplotlib.cm.ScalarMappable(norm=overlay.norm, cmap=overlay.cmap)
    cbar = fig.colorbar(scale, ax=axes.ravel().tolist(), shrink=0.5, aspect=25)
    cbar.set_label("Grad-CAM (normalised)")
    fig.suptitle(title)
    return _save(fig, path)
