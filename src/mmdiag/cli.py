"""The ``mmdiag`` command line: one sub-command per shared pipeline stage, and one sub-app per
method family (``mmdiag cmus ...``, ``mmdiag csmil ...``) from ``mmdiag.methods.<family>.cli``.

Every Snakemake rule calls one of these commands, so every stage also runs by hand. Each
command validates its arguments and calls one stage function; shared option types, settings
loading and error reporting are in :mod:`mmdiag.cli_support`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mmdiag.cli_support import (
    ConfigFiles,
    ManifestPath,
    SettingsJson,
    examples,
    fail,
    layer_over_defaults,
    load_settings,
    method_settings,
    reports_errors,
    setup_logging,
)
from mmdiag.methods import family_module, method_families

app = typer.Typer(
    name="mmdiag",
    help="Multi-modal, multi-scale medical image diagnosis: one command per pipeline stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("mmdiag")


@app.callback()
def main(
    defaults: Annotated[
        bool,
        typer.Option(
            "--defaults/--no-defaults",
            help="Layer --config files over config/config.yaml and config/methods/*.yaml "
            "(default), or read the --config files alone.",
        ),
    ] = True,
) -> None:
    """Each sub-command is one stage of the Snakemake workflow and also runs by hand."""
    setup_logging()
    layer_over_defaults(defaults)


@app.command(
    "check-config",
    epilog=examples(
        "mmdiag check-config",
        "mmdiag check-config -c mine.yaml",
    ),
)
def check_config(config: ConfigFiles = None) -> None:
    """Validate config files against the schema and print the resolved configuration."""
    import yaml

    typer.echo(yaml.safe_dump(load_settings(config, None), sort_keys=False))


@app.command(
    epilog=examples(
        "mmdiag synth --out results/demo/raw",
    )
)
def synth(
    out: Annotated[Path, typer.Option(help="Folder to create (the cohort root).")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    cohort: Annotated[
        str | None, typer.Option(help="A configured cohort to make (e.g. toy_micro).")
    ] = None,
) -> None:
    """Write a seeded synthetic cohort: the multi-modal renal demo cohort (WSI, OM, IM, TEM,
    CT, genes, clinical table), with a cohort's ``generator: toy_mil`` CS-MIL's toy slides, or
    with ``generator: tet`` MHD-Net's thymic tumour cohort (CT + WSI)."""
    from mmdiag.synth import write_configured_cohort

    settings = load_settings(config, settings_json)
    cohorts = settings.get("cohorts", {})
    if cohort is not None and cohort not in cohorts:
        fail(f"unknown cohort {cohort!r}; configured: {sorted(cohorts)}")
    chosen = cohorts[cohort] if cohort else settings.get("cohort") or {}
    write_configured_cohort(out, settings, chosen, progress=progress)


@app.command(
    epilog=examples(
        "mmdiag manifest --root data/my_slides --cohort mine -c mine.yaml --out manifest.tsv",
        "mmdiag manifest --manifest my_manifest.tsv --out manifest.tsv",
    )
)
def manifest(
    out: Annotated[Path, typer.Option(help="Manifest TSV to write.")],
    root: Annotated[
        Path | None, typer.Option(help="Cohort folder (clinical.tsv, images.tsv).")
    ] = None,
    user_manifest: Annotated[
        Path | None, typer.Option("--manifest", help="A manifest TSV of your own instead.")
    ] = None,
    cohort: Annotated[
        str | None, typer.Option(help="Apply this cohort's manifest_rules (e.g. toy_micro).")
    ] = None,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Validate a cohort and write its manifest: one row per image with checksum and labels."""
    from mmdiag.config import cohort_manifest_rules
    from mmdiag.data.manifest import ManifestError, ManifestRules, build_manifest, write_manifest

    if (root is None) == (user_manifest is None):
        fail("give exactly one of --root and --manifest")
    settings = load_settings(config, settings_json)
    rules = ManifestRules.from_config(
        cohort_manifest_rules(settings, cohort) if cohort else settings["manifest"]
    )
    try:
        frame = build_manifest(
            cohort_root=root, manifest_tsv=user_manifest, rules=rules, progress=True
        )
    except ManifestError as error:
        fail(str(error))
    write_manifest(frame, out)
    log.info(
        "manifest %s: %d patients, %d images (%s)",
        out,
        frame["patient_id"].nunique(),
        len(frame),
        ", ".join(f"{m} {n}" for m, n in frame["modality"].value_counts().sort_index().items()),
    )


@app.command(
    epilog=examples(
        "mmdiag splits --manifest results/demo/manifest.tsv --scheme kfold5 --out kfold5.json",
    )
)
def splits(
    manifest_path: ManifestPath,
    scheme: Annotated[str, typer.Option(help="Name of a scheme under splits.schemes.")],
    out: Annotated[Path, typer.Option(help="Split JSON to write.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Write patient-level splits (stratified k-fold, holdout or repeated holdout) as JSON."""
    from mmdiag.data.manifest import read_manifest
    from mmdiag.data.splits import make_splits, write_splits

    split_settings = load_settings(config, settings_json)["splits"]
    if scheme not in split_settings["schemes"]:
        fail(f"unknown split scheme {scheme!r}; allowed: {sorted(split_settings['schemes'])}")
    try:
        result = make_splits(
            read_manifest(manifest_path),
            scheme,
            split_settings["schemes"][scheme],
            seed=split_settings["seed"],
        )
    except ValueError as error:
        fail(f"{manifest_path}: {error}")
    write_splits(result, out)
    sizes = [f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in result["folds"]]
    log.info("splits %s: %d folds (train/val/test %s)", out, len(sizes), ", ".join(sizes))


@app.command(
    epilog=examples(
        "mmdiag aggregate results/cmus/*/fold_*/metrics.tsv --out fold_all.tsv",
    )
)
@reports_errors()
def aggregate(
    metrics: Annotated[list[Path], typer.Argument(help="Per-fold metrics.tsv files.")],
    out: Annotated[Path, typer.Option(help="fold_all.tsv to write.")],
) -> None:
    """Collect per-fold metrics into one long table: method, variant, fold, metric, value."""
    from mmdiag.evaluation import aggregate_fold_metrics
    from mmdiag.io import write_tsv

    table = aggregate_fold_metrics(metrics)
    write_tsv(table, out)
    means = table.groupby(["variant", "metric"])["value"].agg(["mean", "std"])
    log.info("%s: %d rows\n%s", out, len(table), means.round(4).to_string())


@app.command(
    epilog=examples(
        "mmdiag tables --method cmus --fold-all results/cmus/fold_all.tsv --out-dir tables "
        "results/cmus/*/fold_*/predictions.tsv",
    )
)
@reports_errors()
def tables(
    method: Annotated[str, typer.Option("--method", help="Method name (a key of methods).")],
    fold_all: Annotated[Path, typer.Option(help="The method's fold_all.tsv.")],
    out_dir: Annotated[
        Path, typer.Option(help="Folder for summary.tsv, stats.tsv, table.md/.tex.")
    ],
    predictions: Annotated[
        list[Path] | None, typer.Argument(help="predictions.tsv files (prediction-level tests).")
    ] = None,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Summarise folds, test every variant against the reference, and render the paper table."""
    from mmdiag.reporting.report import write_method_tables

    chosen = method_settings(load_settings(config, settings_json), method)
    written = write_method_tables(fold_all, predictions or [], chosen, out_dir=out_dir)
    log.info("%s tables: %s\n%s", method, ", ".join(map(str, written)), written[2].read_text())


@app.command(
    epilog=examples(
        "mmdiag overview --manifest demo=results/demo/manifest.tsv --summary "
        "cmus=results/cmus/summary.tsv --out overview.html",
    )
)
@reports_errors()
def overview(
    out: Annotated[Path, typer.Option(help="overview.html to write.")],
    manifest: Annotated[
        list[str] | None, typer.Option(help="cohort=manifest.tsv, once per cohort.")
    ] = None,
    summary: Annotated[
        list[str] | None, typer.Option(help="method=summary.tsv, once per method.")
    ] = None,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Write the report's overview page: versions, cohorts, splits, each method's headline."""
    from mmdiag.reporting.overview import parse_named_paths, write_overview

    try:
        manifests = parse_named_paths(manifest or [], "--manifest")
        summaries = parse_named_paths(summary or [], "--summary")
    except ValueError as error:
        fail(str(error))
    write_overview(out, load_settings(config, settings_json), manifests, summaries)
    log.info("overview %s: %d cohorts, %d methods", out, len(manifests), len(summaries))


@app.command(
    epilog=examples(
        "mmdiag patch --manifest results/mine/manifest.tsv --image-id slides/P01 --out "
        "P01.zarr --mask P01.png --qc P01_qc.png -c mine.yaml",
    )
)
@reports_errors()
def patch(
    manifest_path: ManifestPath,
    image_id: Annotated[str, typer.Option(help="The slide's image_id in the manifest.")],
    out: Annotated[Path, typer.Option(help="The slide's zarr store to write (.zarr).")],
    mask: Annotated[Path, typer.Option(help="Tissue mask PNG to write.")],
    qc: Annotated[Path, typer.Option(help="QC overlay PNG to write (thumbnail, mask, grid).")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Segment a slide's tissue and store its concentric multi-scale patches (zarr)."""
    from mmdiag.patching.pipeline import patch_manifest_slide

    patch_manifest_slide(
        manifest_path,
        image_id,
        load_settings(config, settings_json)["patching"],
        store_path=out,
        mask_path=mask,
        qc_path=qc,
    )


@app.command(
    "patch-index",
    epilog=examples(
        "mmdiag patch-index results/demo/patches/*.zarr --out index.tsv",
    ),
)
@reports_errors()
def patch_index(
    stores: Annotated[list[Path], typer.Argument(help="The cohort's zarr patch stores.")],
    out: Annotated[Path, typer.Option(help="Index TSV to write.")],
) -> None:
    """List a cohort's patch stores with their patch counts and µm/px (checks each is complete)."""
    from mmdiag.io import write_tsv
    from mmdiag.patching.store import patch_index_table

    index = patch_index_table(stores)
    write_tsv(index, out)
    log.info("%s: %d slides, %d patches", out, len(index), int(index["n_patches"].sum()))


@app.command(
    "ssl-pretrain",
    epilog=examples(
        "mmdiag ssl-pretrain results/demo/patches/*.zarr --scale 20x --out-dir ssl/20x",
    ),
)
@reports_errors()
def ssl_pretrain(
    stores: Annotated[list[Path], typer.Argument(help="Patch stores (.zarr) with pixels.")],
    scale: Annotated[str, typer.Option(help="The scale to pretrain on, e.g. 20x.")],
    out_dir: Annotated[Path, typer.Option(help="Folder to write (encoder.safetensors ...).")],
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Resume state kept between epochs (default: <out-dir>.resume)."),
    ] = None,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """SimSiam pretraining of one encoder (run under torchrun for several GPUs)."""
    from mmdiag.ssl.train import SSLSettings, pretrain

    settings = SSLSettings.from_config(load_settings(config, settings_json)["ssl"])
    state_dir = state_dir or out_dir.with_name(out_dir.name + ".resume")
    pretrain(stores, scale, settings, out_dir=out_dir, state_dir=state_dir)


@app.command(
    "extract-features",
    epilog=examples(
        "mmdiag extract-features results/demo/patches/*.zarr --manifest "
        "results/demo/manifest.tsv --encoder 20x=ssl/20x/encoder.safetensors --encoder "
        "10x=ssl/10x/encoder.safetensors --encoder 5x=ssl/5x/encoder.safetensors --out-dir "
        "features",
    ),
)
@reports_errors(ValueError, FileNotFoundError)
def extract_features(
    stores: Annotated[list[Path], typer.Argument(help="The cohort's patch stores (.zarr).")],
    manifest_path: ManifestPath,
    encoder: Annotated[
        list[str], typer.Option(help="SCALE=PATH of a pretrained encoder.safetensors; repeat.")
    ],
    out_dir: Annotated[Path, typer.Option(help="Folder of feature stores to write.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Embed every patch of every slide at every scale (one zarr per slide: N x S x dim)."""
    from mmdiag.features.extract import (
        ExtractSettings,
        extract_cohort_features,
        slide_ids_of_stores,
    )

    weights = {}
    for item in encoder:
        scale, separator, path = item.partition("=")
        if not separator:
            fail(f"--encoder {item!r}: expected SCALE=PATH")
        weights[scale] = Path(path)
    settings = load_settings(config, settings_json)
    extract = ExtractSettings.from_config(settings["features"], settings["ssl"])
    image_ids = slide_ids_of_stores(stores, manifest_path)
    extract_cohort_features(stores, image_ids, weights, extract, out_dir=out_dir)


@app.command(
    "cluster-features",
    epilog=examples(
        "mmdiag cluster-features features/*.zarr --manifest results/demo/manifest.tsv --out "
        "clusters.tsv",
    ),
)
@reports_errors()
def cluster_features(
    stores: Annotated[
        list[Path], typer.Argument(help="The cohort's feature stores (.zarr), or their folder.")
    ],
    manifest_path: ManifestPath,
    out: Annotated[Path, typer.Option(help="Cluster table TSV to write.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """k-means phenotype clusters of each patient's 20x features (one row per patch)."""
    from mmdiag.features.phenotypes import cluster_cohort
    from mmdiag.io import write_tsv

    settings = load_settings(config, settings_json)["features"]
    table = cluster_cohort(
        stores, manifest_path, n_clusters=settings["n_clusters"], seed=settings["cluster_seed"]
    )
    write_tsv(table, out)
    log.info("%s: %d patches of %d patients", out, len(table), table["patient_id"].nunique())


def _mount_method_families() -> None:
    """``mmdiag <family> ...`` for every method family, and its old command names (hidden)."""
    for family in method_families():
        module = family_module(family, "cli")
        app.add_typer(module.app, name=family)
        for name, command in getattr(module, "ALIASES", {}).items():
            app.command(name, hidden=True)(command)


_mount_method_families()

if __name__ == "__main__":
    app()
