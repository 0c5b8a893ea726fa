"""Input functions of DeepGuide's rules (``workflow/rules/guide.smk``), given the validated
config. Kept in the package, not the rule file, so that they are tested like any other code."""

from __future__ import annotations

from collections.abc import Mapping

from mmdiag.methods.guide.data import LATENT_IDS_FILE, LATENTS_FILE
from mmdiag.methods.guide.settings import LATENT_KINDS, kind_of, upstream


def fold_inputs(config: Mapping, method: str, variant: str, fold: str) -> dict[str, str]:
    """Manifest, split file, the feature stores (superior and nothing else reads slides'
    features), and the fold files of the variants a latent kind reads."""
    settings = config["methods"][method]
    cohort = settings["cohort"]
    inputs = {
        "manifest": f"results/{cohort}/manifest.tsv",
        "splits": f"results/{cohort}/splits/{settings['split']}.json",
    }
    if kind_of(settings, variant) == "superior":
        inputs["features"] = f"results/{cohort}/features/stores"
    for role, name in upstream(settings, variant).items():
        folder = f"results/{method}/{name}/fold_{fold}"
        inputs[f"{role}_model"] = f"{folder}/model.safetensors"
        if role != "guidance":
            inputs[f"{role}_latents"] = f"{folder}/{LATENTS_FILE}"
            inputs[f"{role}_ids"] = f"{folder}/{LATENT_IDS_FILE}"
    return inputs


def source_arguments(config: Mapping, method: str, variant: str, input_files) -> str:
    """``--features DIR`` for a superior variant, ``--results results/{method}`` for a
    latent kind."""
    kind = kind_of(config["methods"][method], variant)
    if kind == "superior":
        return f"--features {input_files.features}"
    if kind in LATENT_KINDS:
        return f"--results results/{method}"
    return ""


def figure_inputs(config: Mapping, method: str, n_folds: int) -> list[str]:
    """The predictions of every variant a confusion matrix draws."""
    figures = config["methods"][method]["figures"]
    return [
        f"results/{method}/{variant}/fold_{fold}/predictions.tsv"
        for variant in figures["confusion"]
        for fold in range(n_folds)
    ]
