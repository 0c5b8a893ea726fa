"""``mmdiag ksfusion ...``: subspace fusion's stages (per-split training of a variant on
every task; figures).

``--method`` names a configured method of the family (``ksfusion`` ...).
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
    load_settings,
    method_manifest_rules,
    method_settings,
    reports_errors,
    set_torch_threads,
    variant_settings,
)

FAMILY = "ksfusion"
app = typer.Typer(
    help="Knowledge-driven subspace fusion: per-split training of each row on diagnosis, "
    "grading and survival; figures.",
    no_args_is_help=True,
)
log = logging.getLogger("mmdiag")
Method = Annotated[str, typer.Option("--method", help="A configured subspace-fusion method.")]


@app.command(
    epilog=examples(
        "mmdiag ksfusion train --variant ours --fold 0 "
        "--manifest results/glioma_demo/manifest.tsv "
        "--splits results/glioma_demo/splits/ksfusion_holdout.json "
        "--features results/glioma_demo/features/stores "
        "--expression results/glioma_demo/raw/genes/expression.tsv "
        "--gene-sets results/glioma_demo/raw/genes/gene_sets.gmt "
        "--out results/ksfusion/ours/fold_0",
    )
)
@reports_errors()
def train(
    variant: VariantName,
    fold: FoldIndex,
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    features: Annotated[Path, typer.Option(help="The cohort's feature stores (features/stores).")],
    expression: Annotated[Path, typer.Option(help="Expression table (samples x genes).")],
    gene_sets: Annotated[Path, typer.Option(help="GMT file with the subspaces' gene sets.")],
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    method: Method = FAMILY,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train one variant on one split for every task; write checkpoint, predictions,
    metrics, log, gene space and config."""
    from mmdiag.methods.ksfusion.fold import FoldInputs, run_ksfusion_fold

    settings = load_settings(config, settings_json)
    chosen, _ = variant_settings(settings, method, variant, FAMILY)
    set_torch_threads(threads)
    run_ksfusion_fold(
        inputs=FoldInputs(manifest_path, splits_path, features, expression, gene_sets),
        fold=fold,
        variant=variant,
        method_settings=chosen,
        manifest_rules=method_manifest_rules(settings, method),
        out_dir=out,
        method=method,
    )


@app.command(
    epilog=examples(
        "mmdiag ksfusion figures --results results/ksfusion --out-dir results/ksfusion/figures"
    )
)
@reports_errors()
def figures(
    results: Annotated[Path, typer.Option(help="The method's results folder (results/{method}).")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the figures.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """ROC curves per classification task and the α sensitivity (supplement Fig. S1)."""
    from mmdiag.methods.ksfusion.figures import write_ksfusion_figures

    settings = load_settings(config, settings_json)
    written = write_ksfusion_figures(
        method=method,
        method_settings=method_settings(settings, method, FAMILY),
        results_dir=results,
        out_dir=out_dir,
    )
    log.info("%s: %d figures in %s", method, len(written), out_dir)
