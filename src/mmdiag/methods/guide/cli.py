"""``mmdiag guide ...``: DeepGuide's stages (per-split training of each kind of variant;
figures).

``--method`` names a configured method of the family (``guide`` ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mmdiag.cli_support import (
    ConfigFiles,
    FoldIndex,
    ManifestPath,
    SettingsJson,
    SplitsPath,
    VariantName,
    examples,
    fail,
    load_settings,
    method_manifest_rules,
    method_settings,
    reports_errors,
    set_torch_threads,
    variant_settings,
)

FAMILY = "guide"
app = typer.Typer(
    help="DeepGuide: superior and inferior classifiers, guidance, guided and control heads "
    "per split; figures.",
    no_args_is_help=True,
)
log = logging.getLogger("mmdiag")
Method = Annotated[str, typer.Option("--method", help="A configured DeepGuide-family method.")]


@app.command(
    epilog=examples(
        "mmdiag guide train --variant p --fold 0 --manifest results/radpath_demo/manifest.tsv "
        "--splits results/radpath_demo/splits/guide_repeated.json "
        "--features results/radpath_demo/features/stores --out results/guide/p/fold_0",
        "mmdiag guide train --variant gr_all --fold 0 "
        "--manifest results/radpath_demo/manifest.tsv "
        "--splits results/radpath_demo/splits/guide_repeated.json "
        "--results results/guide --out results/guide/gr_all/fold_0",
    )
)
@reports_errors()
def train(
    variant: VariantName,
    fold: FoldIndex,
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    method: Method = FAMILY,
    features: Annotated[
        Path | None,
        typer.Option(help="superior only: the cohort's feature stores (features/stores)."),
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="Latent kinds: the method's results folder, whose variants' fold folders of "
            "the same split they read."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train one variant on one split; write checkpoint, predictions, metrics, log, config
    (and, for superior and inferior variants, every patient's latent)."""
    from mmdiag.methods.guide.fold import FoldInputs, run_guide_fold, upstream_folders
    from mmdiag.methods.guide.settings import LATENT_KINDS, recipe

    settings = load_settings(config, settings_json)
    chosen, spec = variant_settings(settings, method, variant, FAMILY)
    set_torch_threads(threads or recipe(chosen, variant)["num_threads"])
    if spec["model"] == "superior" and features is None:
        fail(f"variant {variant!r} is a superior classifier: give --features")
    if spec["model"] in LATENT_KINDS and results is None:
        fail(f"variant {variant!r} reads other variants' latents: give --results")
    inputs = FoldInputs(
        manifest=manifest_path,
        splits=splits_path,
        feature_stores=features,
        upstream=upstream_folders(chosen, variant, results, fold) if results else None,
    )
    run_guide_fold(
        inputs=inputs,
        fold=fold,
        variant=variant,
        method_settings=chosen,
        classes=list(method_manifest_rules(settings, method)["classes"]),
        out_dir=out,
        method=method,
    )


@app.command(
    epilog=examples("mmdiag guide figures --results results/guide --out-dir results/guide/figures")
)
@reports_errors()
def figures(
    results: Annotated[Path, typer.Option(help="The method's results folder (results/{method}).")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the figures.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """The relative improvement of G(I) + I over I per column (Table 1, row 6; supplement
    Fig. 1) and confusion matrices."""
    from mmdiag.methods.guide.figures import write_guide_figures

    settings = load_settings(config, settings_json)
    written = write_guide_figures(
        method=method,
        method_settings=method_settings(settings, method, FAMILY),
        results_dir=results,
        out_dir=out_dir,
    )
    log.info("%s: %d figures in %s", method, len(written), out_dir)
