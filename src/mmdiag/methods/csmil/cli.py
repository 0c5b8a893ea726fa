"""``mmdiag csmil ...``: CS-MIL's stages (per-split training, figures, the toy Table 5).

``--method`` names a configured method of the family (``csmil``, ``csmil_micro`` ...).
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
    variant_settings,
)

FAMILY = "csmil"
app = typer.Typer(
    help="CS-MIL: per-split training from phenotype-clustered bags, figures, toy Table 5.",
    no_args_is_help=True,
)
log = logging.getLogger("mmdiag")
Method = Annotated[str, typer.Option("--method", help="A configured CS-MIL-family method.")]


@app.command(
    epilog=examples(
        "mmdiag csmil train --variant csmil --fold 0 --manifest "
        "results/toy_mixed/manifest.tsv --splits results/toy_mixed/splits/csmil_repeated.json "
        "--clusters results/toy_mixed/features/clusters.tsv --out-dir fold_0 "
        "results/toy_mixed/features/stores",
    )
)
@reports_errors()
def train(
    variant: VariantName,
    fold: FoldIndex,
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    clusters: Annotated[Path, typer.Option(help="clusters.tsv of the cohort.")],
    features: Annotated[
        list[Path], typer.Argument(help="The cohort's feature stores (.zarr), or their folder.")
    ],
    out_dir: Annotated[Path, typer.Option(help="Fold folder to write.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train and test one CS-MIL variant on one split (bags from phenotype clusters)."""
    from mmdiag.features.store import feature_store_paths
    from mmdiag.methods.csmil.fold import run_csmil_fold

    settings = load_settings(config, settings_json)
    chosen, _ = variant_settings(settings, method, variant, FAMILY)
    run_csmil_fold(
        manifest_path=manifest_path,
        splits_path=splits_path,
        feature_paths=feature_store_paths(features),
        clusters_path=clusters,
        fold=fold,
        variant=variant,
        method=method,
        method_settings=chosen,
        classes=method_manifest_rules(settings, method)["classes"],
        out_dir=out_dir,
    )


@app.command(
    epilog=examples(
        "mmdiag csmil figures --results results/csmil --manifest "
        "results/toy_mixed/manifest.tsv --features results/toy_mixed/features/stores --out-dir "
        "figures",
    )
)
@reports_errors()
def figures(
    results: Annotated[Path, typer.Option(help="The method's results folder.")],
    manifest_path: ManifestPath,
    features: Annotated[Path, typer.Option(help="The cohort's features folder.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the PNG figures.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """ROC/PR curves of every variant, attention maps and scale-attention box plots."""
    from mmdiag.data.manifest import read_manifest
    from mmdiag.methods.csmil.figures import write_csmil_figures

    chosen = method_settings(load_settings(config, settings_json), method, FAMILY)
    written = write_csmil_figures(results, chosen, read_manifest(manifest_path), features, out_dir)
    log.info("%s: %d figures in %s", method, len(written), out_dir)


@app.command(
    "toy-table",
    epilog=examples(
        "mmdiag csmil toy-table --micro results/csmil_micro/fold_all.tsv --macro "
        "results/csmil_macro/fold_all.tsv --out-dir tables",
    ),
)
@reports_errors()
def toy_table(
    micro: Annotated[Path, typer.Option(help="fold_all.tsv of the micro-anomaly method.")],
    macro: Annotated[Path, typer.Option(help="fold_all.tsv of the macro-anomaly method.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for table5.md/.tex/.tsv.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """CS-MIL's Table 5: AUC and AP of every variant on both toy datasets."""
    from mmdiag.methods.csmil.toy_table import write_toy_table

    chosen = method_settings(load_settings(config, settings_json), method, FAMILY)
    written = write_toy_table(micro, macro, chosen, out_dir)
    log.info("toy benchmark table:\n%s", written[0].read_text())


#: The commands' names before they moved under ``mmdiag csmil`` (hidden; kept one release).
ALIASES = {"csmil-train": train, "csmil-figures": figures, "csmil-toy-table": toy_table}
