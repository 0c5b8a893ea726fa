"""MHD-Net's figures from its fold results (``methods.<name>.figures``).

- Fig. 5 (``roc``): one-vs-rest ROC per type of the teacher variants (CT + WSI), with the
  radiology-only and pathology-only branches of one teacher (the paper's "Rad." and "Pat."
  models are single branches; here they are the branches of the trained teacher, read from its
  ``branches.tsv``).
- Fig. 6 (``confusion``): confusion matrices of student variants, CT sequences pooled over folds.
- Fig. 7 left (``sweeps``): mAcc against a loss weight, one series per swept weight.
- Fig. 7 right (``parameters``): parameter counts of variants' networks: a teacher's three
  branches with SHFMs (not the memory, which is a buffer), a student's ResNet-18 with its SHFMs
  (the deployed model also runs the teacher's ``B_R``, counted in its own bar when listed), an
  SCKD variant's CT student, and any other CT network (a CT ResNet, a comparison method) whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmdiag.io import read_tsv
from mmdiag.methods.mhd.settings import build_model, type_classes
from mmdiag.reporting import figures

SWEEP_LABELS = {"alpha_conmb": "α_ConMB", "alpha_mse": "α_MSE", "alpha_kl": "α_KL"}


def write_mhd_figures(
    *,
    method: str,
    method_settings: Mapping,
    manifest_rules: Mapping,
    results_dir: Path,
    out_dir: Path,
) -> list[Path]:
    """Write every configured figure of the method as a PNG in ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = method_settings["figures"]
    labels = _labels(method_settings)
    written = []
    if spec["roc"]["rows"]:
        written.append(_roc_figure(results_dir, spec["roc"], labels, out_dir))
    for variant in spec["confusion"]:
        written.append(
            figures.plot_confusion(
                figures.variant_predictions(results_dir, variant),
                out_dir / f"confusion_{variant}.png",
                title=f"{labels.get(variant, variant)} (Fig. 6)",
                unit="CT sequences",
            )
        )
    if spec["sweeps"]:
        written.append(_sweep_figure(results_dir, spec["sweeps"], out_dir))
    if spec["parameters"]:
        n_types = len(type_classes(method_settings, manifest_rules))
        counts = {
            labels.get(v, v): parameter_count(method_settings, v, n_types)
            for v in spec["parameters"]
        }
        written.append(
            figures.plot_parameter_counts(
                counts, out_dir / "parameters.png", title=f"{method}: parameters (Fig. 7, right)"
            )
        )
    return written


def _labels(method_settings: Mapping) -> dict[str, str]:
    """Row labels of the method's tables, then the figures' own labels over them."""
    labels: dict[str, str] = {}
    for table in method_settings.get("tables", {}).values():
        labels |= table.get("labels", {})
    return labels | method_settings["figures"]["labels"]


def _roc_figure(results_dir: Path, roc: Mapping, labels: Mapping, out_dir: Path) -> Path:
    models = {labels.get(v, v): figures.variant_predictions(results_dir, v) for v in roc["rows"]}
    if roc["branches_of"]:
        branches = figures.variant_predictions(results_dir, roc["branches_of"], "branches.tsv")
        for branch, label in (("radiology", "Rad. branch"), ("pathology", "Pat. branch")):
            rows = branches[branches["branch"] == branch].drop(columns="branch")
            models[f"{label} of {labels.get(roc['branches_of'], roc['branches_of'])}"] = rows
    return figures.plot_roc_comparison(
        models, out_dir / "roc_teachers.png", title="Teachers, one-vs-rest ROC per type (Fig. 5)"
    )


def _sweep_figure(results_dir: Path, sweeps: Mapping, out_dir: Path) -> Path:
    fold_all = read_tsv(Path(results_dir) / "fold_all.tsv")
    settings = {
        variant: (SWEEP_LABELS.get(weight, weight), float(value))
        for weight, points in sweeps.items()
        for variant, value in points.items()
    }
    return figures.plot_metric_by_setting(
        fold_all,
        settings,
        out_dir / "loss_weights.png",
        metrics=("mAcc",),
        title="Loss weights (Fig. 7, left)",
        xlabel="weight",
    )


def parameter_count(method_settings: Mapping, variant: str, n_types: int) -> int:
    """Trainable parameters of a variant's own network (see the module docstring)."""
    model = build_model(method_settings, variant, n_types)
    kind = method_settings["variants"][variant]["model"]
    parts = {"teacher": lambda m: m.teacher, "student": lambda m: m.student}
    parts["sckd"] = parts["student"]  # the distilled CT network, not the frozen teacher
    part = parts.get(kind, lambda m: m)
    return sum(p.numel() for p in part(model).parameters())
