"""The report's overview page: what ran, on which cohorts and splits, and each method's headline.

One standalone HTML page (``results/overview.html``, the first result of the Snakemake report)
with the library versions, every cohort's patients and images per modality (from its
manifest), and per method its family, cohort, split scheme (type and number of folds), its
variants, and its headline row (a variant's metric, mean ± sample std over the folds) beside
the number its paper reports for that row (``methods.<name>.headline`` in the config).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path

import mmdiag
from mmdiag.io import atomic_path, read_tsv
from mmdiag.reporting.tables import html_page, html_table

__all__ = ["parse_named_paths", "render_overview", "write_overview"]


def _versions() -> dict[str, str]:
    import snakemake
    import torch

    return {
        "mmdiag": mmdiag.__version__,
        "snakemake": snakemake.__version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def cohort_rows(manifests: Mapping[str, Path]) -> list[list[str]]:
    """Per cohort: patients, images, and images per modality."""
    rows = []
    for cohort, path in sorted(manifests.items()):
        manifest = read_tsv(path)
        counts = manifest["modality"].value_counts().sort_index()
        per_modality = ", ".join(f"{m} {n}" for m, n in counts.items())
        rows.append([cohort, manifest["patient_id"].nunique(), len(manifest), per_modality])
    return rows


def _headline_cells(settings: Mapping, summary_path: Path | None) -> list[str]:
    """The headline variant and metric, our mean ± std, and the paper's value."""
    headline = settings.get("headline")
    if not headline:
        return ["", "", "", ""]
    variant, metric = headline["variant"], headline["metric"]
    ours = "not run"
    if summary_path is not None and summary_path.is_file():
        summary = read_tsv(summary_path)
        row = summary[(summary["variant"] == variant) & (summary["metric"] == metric)]
        if len(row):
            mean, std, n = (row.iloc[0][c] for c in ("mean", "std", "n_folds"))
            ours = f"{mean:.4f} ± {std:.4f} ({int(n)} folds)"
    paper = f"{headline['paper']:.4f} ({headline.get('source') or 'paper'})"
    return [f"{variant}", metric, ours, paper]


def method_rows(config: Mapping, summaries: Mapping[str, Path]) -> list[list[str]]:
    """Per method: family, cohort, split, variants, headline row against the paper's."""
    rows = []
    for method, settings in config["methods"].items():
        scheme = config["splits"]["schemes"][settings["split"]]
        rows.append(
            [
                method,
                settings["family"],
                settings["cohort"],
                f"{settings['split']} ({scheme['type']})",
                len(settings["variants"]),
                *_headline_cells(settings, summaries.get(method)),
            ]
        )
    return rows


def render_overview(
    config: Mapping, manifests: Mapping[str, Path], summaries: Mapping[str, Path]
) -> str:
    """The overview page (see the module docstring) as a standalone HTML document."""
    versions = html_table(
        ["package", "version"], [[k, v] for k, v in _versions().items()], "Software"
    )
    cohorts = html_table(
        ["cohort", "patients", "images", "images per modality"],
        cohort_rows(manifests),
        "Cohorts (from each manifest)",
    )
    methods = html_table(
        [
            "method",
            "family",
            "cohort",
            "split (type)",
            "variants",
            "headline row",
            "metric",
            "this run (mean ± std)",
            "paper",
        ],
        method_rows(config, summaries),
        "Methods: each headline row of this run against the paper's number for it",
    )
    note = (
        "The demo configuration trains tiny encoders for a few epochs on a small synthetic "
        "cohort, so its numbers show that the pipeline runs end to end, not the papers' "
        "results; config/paper/ holds the papers' settings for real cohorts."
    )
    body = f"<h1>mmdiag run overview</h1>{methods}{cohorts}{versions}"
    return html_page("mmdiag run", body, note)


def write_overview(
    path: Path, config: Mapping, manifests: Mapping[str, Path], summaries: Mapping[str, Path]
) -> Path:
    """Write :func:`render_overview` to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(render_overview(config, manifests, summaries))
    return Path(path)


def parse_named_paths(items: list[str], what: str) -> dict[str, Path]:
    """``name=path`` command-line items as a mapping; ``ValueError`` naming a bad item."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} must be given as name=path, got {item!r}")
        named[name] = Path(path)
    return named
