"""Input functions of CMUS-Net's rules (``workflow/rules/cmus.smk``), given the validated config.

Kept in the package, not the rule file, so that the rule file holds rules only and these are
tested like any other code.
"""

from __future__ import annotations

from collections.abc import Mapping


def method_of_cohort(config: Mapping, cohort: str) -> str:
    """The CMUS-family method whose segmentation settings apply to a cohort (the first)."""
    for method, settings in config["methods"].items():
        if settings["family"] == "cmus" and settings["cohort"] == cohort:
            return method
    raise ValueError(f"no CMUS method uses cohort {cohort!r}")


def fold_inputs(config: Mapping, method: str) -> dict[str, str]:
    """Manifest, split file and (when the OM crop is on) the segmentation table of a method."""
    settings = config["methods"][method]
    cohort = settings["cohort"]
    inputs = {
        "manifest": f"results/{cohort}/manifest.tsv",
        "splits": f"results/{cohort}/splits/{settings['split']}.json",
    }
    if settings["preprocess"]["om_glomerulus_crop"]:
        inputs["glomeruli"] = f"results/{cohort}/masks/glomerulus/glomeruli.tsv"
    return inputs


def crop_argument(input_files) -> str:
    """``--glomeruli FILE`` when the rule's inputs hold the segmentation table."""
    return f"--glomeruli {input_files.glomeruli}" if "glomeruli" in input_files.keys() else ""


def vote_members(config: Mapping, method: str, variant: str, fold: str) -> list[str]:
    """The member variants' predictions of a late-vote variant on one fold, in order."""
    members = config["methods"][method]["variants"][variant]["members"]
    return [f"results/{method}/{member}/fold_{fold}/predictions.tsv" for member in members]
