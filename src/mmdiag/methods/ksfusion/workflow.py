"""Input functions of subspace fusion's rules (``workflow/rules/ksfusion.smk``), given the
validated config. Kept in the package, not the rule file, so that they are tested like any
other code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def cohort_folder(config: Mapping, cohort: str) -> Path:
    """The folder a cohort's relative gene-table paths are taken in: a synthetic cohort's
    ``results/{cohort}/raw``, a cohort folder's root, a user manifest's folder."""
    settings = config["cohorts"][cohort]
    if settings["synthetic"]:
        return Path(f"results/{cohort}/raw")
    if settings["manifest"]:
        return Path(settings["manifest"]).parent
    return Path(settings["root"])


def gene_files(config: Mapping, method: str) -> dict[str, str]:
    """``expression`` and ``gene_sets`` of a method, resolved in its cohort's folder."""
    settings = config["methods"][method]
    folder = cohort_folder(config, settings["cohort"])
    genes = settings["genes"]
    return {key: str(folder / Path(genes[key]).expanduser()) for key in ("expression", "gene_sets")}


def fold_inputs(config: Mapping, method: str) -> dict[str, str]:
    """Manifest, split file, the cohort's feature stores and its gene files (for a synthetic
    cohort its whole raw folder, which holds them)."""
    settings = config["methods"][method]
    cohort = settings["cohort"]
    inputs = {
        "manifest": f"results/{cohort}/manifest.tsv",
        "splits": f"results/{cohort}/splits/{settings['split']}.json",
        "features": f"results/{cohort}/features/stores",
    }
    if config["cohorts"][cohort]["synthetic"]:
        return inputs | {"raw": f"results/{cohort}/raw"}
    return inputs | gene_files(config, method)


def figure_inputs(config: Mapping, method: str, n_folds: int) -> list[str]:
    """The predictions of every variant a figure draws."""
    figures = config["methods"][method].get("figures") or {}
    variants = dict.fromkeys([*(figures.get("roc") or []), *(figures.get("alpha") or [])])
    return [
        f"results/{method}/{variant}/fold_{fold}/predictions.tsv"
        for variant in variants
        for fold in range(n_folds)
    ]
