"""CMUS-Net's settings as the trainer and the figures use them (``methods.<name>``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from mmdiag.models.aggn import CMUSAGGN
from mmdiag.models.cmus import CMUSConcat, CMUSNet
from mmdiag.models.mdl_iia import MDLIIA
from mmdiag.models.mmformer import CMUSMMFormer
from mmdiag.models.mmgl import MMGL
from mmdiag.models.msan import CMUSMSAN
from mmdiag.training.loop import TrainSettings

#: The manifest rule that lists each task's classes.
TASK_CLASSES_KEY = {"disease": "classes", "mn_stage": "stages"}
MODEL_CLASSES = {
    "cmus_net": CMUSNet,
    "cmus_concat": CMUSConcat,
    # Table 4's multi-modal rows
    "mmgl": MMGL,
    "cmus_mmformer": CMUSMMFormer,
    "mdl_iia": MDLIIA,
    "cmus_msan": CMUSMSAN,
    "cmus_aggn": CMUSAGGN,
}


def task_classes(method_settings: Mapping, manifest_rules: Mapping) -> list[str]:
    """Class names of the method's task (diseases, or MN stages) under its cohort's rules."""
    return list(manifest_rules[TASK_CLASSES_KEY[method_settings["task"]]])


def model_arguments(model_name: str, variant_settings: Mapping) -> dict:
    """The variant's settings that the model's constructor takes (the rest is for the runner)."""
    accepted = inspect.signature(MODEL_CLASSES[model_name].__init__).parameters
    return {k: v for k, v in variant_settings.items() if k in accepted and k != "num_classes"}


def train_settings_of(method_settings: Mapping, variant: str) -> TrainSettings:
    """The method's training settings with the variant's overrides."""
    options = method_settings["train"] | method_settings["variants"][variant].get("train", {})
    return TrainSettings(**{k: v for k, v in options.items() if k != "num_threads"})


def is_vote(variant_settings: Mapping) -> bool:
    """A late-vote variant combines trained members' predictions; it trains nothing."""
    return variant_settings["model"] == "late_vote"
