"""Input functions of MHD-Net's rules (``workflow/rules/mhd.smk``), given the validated config.

Kept in the package, not the rule file, so that the rule file holds rules only and these are
tested like any other code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mmdiag.methods.mhd.kinds import CT_ONLY_KINDS, TEACHER_READERS


def reads_slides(config: Mapping, method: str, variant: str) -> bool:
    """Whether a variant trains on WSI (teachers, students, mmformer, moddrop and sckd; the CT
    baseline and pcct do not)."""
    return config["methods"][method]["variants"][variant]["model"] not in CT_ONLY_KINDS


def fold_inputs(config: Mapping, method: str, variant: str, fold: str) -> dict[str, str]:
    """Manifest, split file and the teacher checkpoint of the same fold for a student or an
    SCKD variant."""
    settings = config["methods"][method]
    cohort = settings["cohort"]
    inputs = {
        "manifest": f"results/{cohort}/manifest.tsv",
        "splits": f"results/{cohort}/splits/{settings['split']}.json",
    }
    spec = settings["variants"][variant]
    if spec["model"] in TEACHER_READERS:
        inputs["teacher"] = f"results/{method}/{spec['teacher']}/fold_{fold}/model.safetensors"
    return inputs


def slide_inputs(
    config: Mapping, method: str, variant: str, patch_stores: Callable[[str], list[str]]
) -> list[str]:
    """The cohort's patch stores for a variant that reads WSI (none for the CT-only kinds).

    ``patch_stores(cohort)`` lists the cohort's stores (it waits for the manifest checkpoint).
    A job that learns from slides lists every store, though it opens only its training
    patients' slides.
    """
    if not reads_slides(config, method, variant):
        return []
    return patch_stores(config["methods"][method]["cohort"])


def teacher_argument(input_files) -> str:
    """``--teacher FILE`` when the rule's inputs hold a teacher checkpoint."""
    return f"--teacher {input_files.teacher}" if "teacher" in input_files.keys() else ""


def figure_inputs(config: Mapping, method: str, n_folds: int) -> list[str]:
    """Every fold file the figures read: predictions of each variant, branches of teachers."""
    variants = config["methods"][method]["variants"]
    files = []
    for variant, spec in variants.items():
        for fold in range(n_folds):
            files.append(f"results/{method}/{variant}/fold_{fold}/predictions.tsv")
            if spec["model"] == "teacher":
                files.append(f"results/{method}/{variant}/fold_{fold}/branches.tsv")
    return files
