"""CS-MIL's settings as the trainer uses them (``methods.<name>`` in the config)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def binary_classes(classes: Sequence[str], positive_class: str) -> list[str]:
    """The cohort's two classes, negative first; ``ValueError`` unless ``positive_class`` is
    one of exactly two."""
    if positive_class not in classes or len(classes) != 2:
        raise ValueError(
            f"CS-MIL needs two classes with {positive_class!r} among them; "
            f"the manifest allows {list(classes)}"
        )
    return list(classes)


def config_problems(method: str, settings: Mapping, config: Mapping):
    """Checked when the config is validated (before any job runs): CS-MIL's cohort must have
    exactly two classes, ``positive_class`` among them."""
    from mmdiag.config import cohort_manifest_rules

    if settings["cohort"] not in config.get("cohorts", {}):
        return
    classes = cohort_manifest_rules(config, settings["cohort"])["classes"]
    try:
        binary_classes(classes, settings["positive_class"])
    except ValueError as error:
        yield f"methods.{method}: {error} (cohort {settings['cohort']!r})"


def cluster_column(variant_settings: Mapping) -> str:
    """The clusters.tsv column that stratifies a variant's bags (Table 1's Clustering column):
    ``cluster`` (20x) unless the variant names another scale."""
    scale = variant_settings["cluster_scale"]
    return f"cluster_{scale}" if scale else "cluster"


def stratified_bags(variant_settings: Mapping) -> bool:
    """Bags drawn evenly from the phenotype clusters (false: Table 3's naive sampling)."""
    return bool(variant_settings["clustering"])
