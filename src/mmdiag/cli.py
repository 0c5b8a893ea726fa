"""The ``mmdiag`` command line: one sub-command per pipeline stage.

Every Snakemake rule calls one of these commands, so every stage also runs by hand. Settings
come from the YAML config files (``--config``, validated against ``config/schema.yaml``) or,
when Snakemake calls, from ``--settings-json``: the already validated section(s) the stage needs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="mmdiag",
    help="Multi-modal, multi-scale medical image diagnosis: one command per pipeline stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("mmdiag")

ConfigFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file(s), merged in order (default: config/config.yaml and "
        "config/methods/*.yaml in the current folder).",
    ),
]
SettingsJson = Annotated[
    str | None,
    typer.Option(help="Validated settings as JSON (how Snakemake passes them); replaces --config."),
]
MethodName = Annotated[str, typer.Option("--method", help="Method name (a key of methods).")]
ManifestPath = Annotated[Path, typer.Option("--manifest", help="Manifest TSV.")]
SplitsPath = Annotated[Path, typer.Option("--splits", help="Split JSON.")]
GlomeruliPath = Annotated[
    Path | None,
    typer.Option("--glomeruli", help="glomeruli.tsv of the segmentation step (OM crops)."),
]


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _settings(config_files: list[Path] | None, settings_json: str | None) -> dict:
    """The validated configuration, from JSON (Snakemake) or from YAML files (by hand)."""
    from mmdiag.config import load_config

    if settings_json:
        return json.loads(settings_json)
    if not config_files:
        config_files = [Path("config/config.yaml"), *sorted(Path("config/methods").glob("*.yaml"))]
    return load_config(config_files)


def _method_settings(settings: dict, method: str) -> dict:
    """A configured method's settings, or a clear error naming the configured ones."""
    if method not in settings["methods"]:
        _fail(f"unknown method {method!r}; configured: {sorted(settings['methods'])}")
    return settings["methods"][method]


def _variant_settings(settings: dict, method: str, variant: str) -> tuple[dict, dict]:
    """A method's settings and one of its variants', or a clear error naming the configured ones."""
    method_settings = _method_settings(settings, method)
    if variant not in method_settings["variants"]:
        _fail(f"unknown variant {variant!r}; configured: {sorted(method_settings['variants'])}")
    return method_settings, method_settings["variants"][variant]


def _feature_store_paths(paths: list[Path]) -> list[Path]:
    """Feature stores given directly (``*.zarr``) or as folders holding them (searched)."""
    found = []
    for path in paths:
        if path.suffix == ".zarr":
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("*.zarr")))
        else:
            _fail(f"{path}: neither a feature store (.zarr) nor a folder of them")
    if not found:
        _fail(f"no feature stores in {[str(p) for p in paths]}")
    return found


def _cohort_manifest_rules(settings: dict, cohort: str) -> dict:
    """The manifest rules of a cohort: its overrides on the manifest section (from YAML
    files; Snakemake passes the merged rules as ``manifest``)."""
    overrides = settings.get("cohorts", {}).get(cohort, {}).get("manifest_rules", {})
    return dict(settings["manifest"]) | overrides


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code=1)


@app.callback()
def main() -> None:
    """Each sub-command is one stage of the Snakemake workflow and also runs by hand."""
    _setup_logging()


@app.command("check-config")
def check_config(config: ConfigFiles = None) -> None:
    """Validate config files against the schema and print the resolved configuration."""
    import yaml

    from mmdiag.config import ConfigError

    try:
        resolved = _settings(config, None)
    except ConfigError as error:
        _fail(str(error))
    typer.echo(yaml.safe_dump(resolved, sort_keys=False))


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to create (the cohort root).")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    cohort_name: Annotated[
        str | None, typer.Option("--cohort", help="A configured cohort to make (e.g. toy_micro).")
    ] = None,
) -> None:
    """Write a seeded synthetic cohort: the multi-modal renal demo cohort (WSI, OM, IM, TEM,
    CT, genes, clinical table), or with a cohort's ``generator: toy_mil`` CS-MIL's toy slides."""
    from mmdiag.synth import write_synthetic_cohort

    settings = _settings(config, settings_json)
    if cohort_name is not None and cohort_name not in settings.get("cohorts", {}):
        _fail(f"unknown cohort {cohort_name!r}; configured: {sorted(settings.get('cohorts', {}))}")
    cohort = settings["cohorts"][cohort_name] if cohort_name else settings.get("cohort") or {}
    if cohort.get("generator") == "toy_mil":
        from mmdiag.synth.toy_mil import write_toy_cohort

        toy = cohort["toy"]
        write_toy_cohort(
            out,
            kind=toy["kind"],
            n_slides=toy["n_slides"],
            n_sites=toy["n_sites"],
            seed=toy["seed"],
            patch_px=settings["patching"]["patch_px"],
            progress=progress,
        )
        return
    write_synthetic_cohort(out, settings["synth"], progress=progress)


@app.command()
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
    from mmdiag.data.manifest import ManifestError, ManifestRules, build_manifest, write_manifest

    if (root is None) == (user_manifest is None):
        _fail("give exactly one of --root and --manifest")
    settings = _settings(config, settings_json)
    rules_settings = _cohort_manifest_rules(settings, cohort) if cohort else settings["manifest"]
    rules = ManifestRules(
        classes=tuple(rules_settings["classes"]),
        stages=tuple(rules_settings["stages"]),
        required_modalities=tuple(rules_settings["required_modalities"]),
        min_image_px=dict(rules_settings["min_image_px"]),
    )
    try:
        frame = build_manifest(
            cohort_root=root, manifest_tsv=user_manifest, rules=rules, progress=True
        )
    except ManifestError as error:
        _fail(str(error))
    write_manifest(frame, out)
    log.info(
        "manifest %s: %d patients, %d images (%s)",
        out,
        frame["patient_id"].nunique(),
        len(frame),
        ", ".join(f"{m} {n}" for m, n in frame["modality"].value_counts().sort_index().items()),
    )


@app.command()
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

    split_settings = _settings(config, settings_json)["splits"]
    if scheme not in split_settings["schemes"]:
        _fail(f"unknown split scheme {scheme!r}; allowed: {sorted(split_settings['schemes'])}")
    try:
        result = make_splits(
            read_manifest(manifest_path),
            scheme,
            split_settings["schemes"][scheme],
            seed=split_settings["seed"],
        )
    except ValueError as error:
        _fail(f"{manifest_path}: {error}")
    write_splits(result, out)
    sizes = [f"{len(f['train'])}/{len(f['val'])}/{len(f['test'])}" for f in result["folds"]]
    log.info("splits %s: %d folds (train/val/test %s)", out, len(sizes), ", ".join(sizes))


@app.command()
def train(
    method: MethodName,
    variant: Annotated[str, typer.Option(help="Variant (a row of the method's tables).")],
    fold: Annotated[int, typer.Option(help="Fold index in the split file.")],
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    glomeruli: GlomeruliPath = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train one variant on one fold; write checkpoint, predictions, metrics, log and config."""
    import torch

    settings = _settings(config, settings_json)
    method_settings, variant_settings = _variant_settings(settings, method, variant)
    threads = threads or method_settings["train"].get("num_threads", 0)
    if threads:
        torch.set_num_threads(threads)
    if not method.startswith("cmus"):
        _fail(f"method {method!r} has no trainer yet")
    if variant_settings["model"] == "late_vote":
        _fail(f"variant {variant!r} is a late vote: run `mmdiag vote`, not `mmdiag train`")
    from mmdiag.training.cmus_fold import run_cmus_fold

    run_cmus_fold(
        manifest_path=manifest_path,
        splits_path=splits_path,
        fold=fold,
        variant=variant,
        method_settings=method_settings,
        manifest_rules=settings["manifest"],
        out_dir=out,
        method=method,
        glomeruli_path=glomeruli,
    )


@app.command()
def vote(
    method: MethodName,
    variant: Annotated[str, typer.Option(help="A late_vote variant.")],
    fold: Annotated[int, typer.Option(help="Fold index.")],
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    members: Annotated[
        list[Path], typer.Argument(help="predictions.tsv of each member variant, this fold.")
    ],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Late fusion: majority vote of trained variants' predictions on one fold (no training)."""
    from mmdiag.training.cmus_fold import run_vote_fold

    settings = _settings(config, settings_json)
    method_settings, variant_settings = _variant_settings(settings, method, variant)
    names = variant_settings["members"]
    if len(members) != len(names):
        _fail(f"variant {variant!r} votes over {names}; got {len(members)} prediction files")
    run_vote_fold(
        member_predictions=dict(zip(names, members, strict=True)),
        fold=fold,
        variant=variant,
        method_settings=method_settings,
        manifest_rules=settings["manifest"],
        out_dir=out,
        method=method,
    )


@app.command()
def segment(
    manifest_path: ManifestPath,
    out_dir: Annotated[Path, typer.Option(help="Folder for masks/, qc/ and glomeruli.tsv.")],
    method: Annotated[str, typer.Option(help="Method whose segmentation settings apply.")] = "cmus",
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Segment the glomerulus of every OM image: SAM with a checkpoint, else classical masks."""
    from mmdiag.data.manifest import read_manifest
    from mmdiag.io import write_tsv
    from mmdiag.segment import segment_cohort

    segmentation = _settings(config, settings_json)["methods"][method]["segmentation"]
    table = segment_cohort(
        read_manifest(manifest_path),
        out_dir,
        prompts_tsv=Path(segmentation["prompts"]) if segmentation["prompts"] else None,
        sam_checkpoint=(
            Path(segmentation["sam_checkpoint"]) if segmentation["sam_checkpoint"] else None
        ),
        sam_model_type=segmentation["sam_model_type"],
        crop_margin=segmentation["crop_margin"],
    )
    write_tsv(table, out_dir / "glomeruli.tsv")
    log.info(
        "segmented %d OM images (%s) into %s",
        len(table),
        ", ".join(f"{k} {v}" for k, v in table["method"].value_counts().items()),
        out_dir,
    )


@app.command()
def aggregate(
    metrics: Annotated[list[Path], typer.Argument(help="Per-fold metrics.tsv files.")],
    out: Annotated[Path, typer.Option(help="fold_all.tsv to write.")],
) -> None:
    """Collect per-fold metrics into one long table: method, variant, fold, metric, value."""
    from mmdiag.evaluation import aggregate_fold_metrics
    from mmdiag.io import write_tsv

    try:
        table = aggregate_fold_metrics(metrics)
    except ValueError as error:
        _fail(str(error))
    write_tsv(table, out)
    means = table.groupby(["variant", "metric"])["value"].agg(["mean", "std"])
    log.info("%s: %d rows\n%s", out, len(table), means.round(4).to_string())


@app.command()
def tables(
    method: MethodName,
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

    settings = _settings(config, settings_json)
    method_settings = _method_settings(settings, method)
    try:
        written = write_method_tables(fold_all, predictions or [], method_settings, out_dir=out_dir)
    except ValueError as error:
        _fail(str(error))
    log.info("%s tables: %s\n%s", method, ", ".join(map(str, written)), written[2].read_text())


@app.command()
def figures(
    method: MethodName,
    results: Annotated[Path, typer.Option(help="The method's results folder (results/{method}).")],
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    out_dir: Annotated[Path, typer.Option(help="Folder for the PNG figures.")],
    glomeruli: GlomeruliPath = None,
    fold: Annotated[int, typer.Option(help="Fold whose model t-SNE and Grad-CAM explain.")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """ROC curves, confusion matrices, t-SNE, Grad-CAM and the batch-size/loss-weight plots."""
    from mmdiag.reporting.cmus_figures import write_cmus_figures

    settings = _settings(config, settings_json)
    written = write_cmus_figures(
        method=method,
        method_settings=_method_settings(settings, method),
        manifest_rules=settings["manifest"],
        results_dir=results,
        manifest_path=manifest_path,
        splits_path=splits_path,
        out_dir=out_dir,
        glomeruli_path=glomeruli,
        explain_fold=fold,
    )
    log.info("%s: %d figures in %s", method, len(written), out_dir)


@app.command()
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
    from mmdiag.data.manifest import read_manifest
    from mmdiag.patching.pipeline import patch_slide
    from mmdiag.patching.slide import SlideError

    settings = _settings(config, settings_json)["patching"]
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["image_id"] == image_id]
    if len(rows) != 1:
        _fail(f"{manifest_path}: no single row with image_id {image_id!r}")
    row = rows.iloc[0]
    mpp = row.get("mpp") if "mpp" in rows.columns else None
    try:
        patch_slide(
            Path(row["path"]),
            settings,
            store_path=out,
            mask_path=mask,
            qc_path=qc,
            mpp_override=float(mpp) if mpp is not None and mpp == mpp else None,
        )
    except SlideError as error:
        _fail(str(error))


@app.command("patch-index")
def patch_index(
    stores: Annotated[list[Path], typer.Argument(help="The cohort's zarr patch stores.")],
    out: Annotated[Path, typer.Option(help="Index TSV to write.")],
) -> None:
    """List a cohort's patch stores with their patch counts and µm/px (checks each is complete)."""
    import pandas as pd

    from mmdiag.io import write_tsv
    from mmdiag.patching.store import open_patch_store

    rows = []
    for path in stores:
        store = open_patch_store(path)
        rows.append(
            {
                "store": str(path),
                "slide_path": store.attrs["slide_path"],
                "n_patches": len(store.grid),
                "mpp": store.attrs["mpp"],
                "mpp_source": store.attrs["mpp_source"],
            }
        )
    index = pd.DataFrame(rows)
    write_tsv(index, out)
    log.info("%s: %d slides, %d patches", out, len(index), int(index["n_patches"].sum()))


@app.command("ssl-pretrain")
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

    settings = SSLSettings.from_config(_settings(config, settings_json)["ssl"])
    state_dir = state_dir or out_dir.with_name(out_dir.name + ".resume")
    try:
        pretrain(stores, scale, settings, out_dir=out_dir, state_dir=state_dir)
    except ValueError as error:
        _fail(str(error))


@app.command("extract-features")
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
    from mmdiag.data.manifest import read_manifest
    from mmdiag.features.extract import ExtractSettings, extract_cohort_features
    from mmdiag.patching.store import open_patch_store

    settings = _settings(config, settings_json)
    weights = {}
    for item in encoder:
        scale, separator, path = item.partition("=")
        if not separator:
            _fail(f"--encoder {item!r}: expected SCALE=PATH")
        weights[scale] = Path(path)
    manifest = read_manifest(manifest_path)
    image_of_path = {
        str(Path(p).resolve()): i
        for p, i in zip(manifest["path"], manifest["image_id"], strict=True)
    }
    image_ids = []
    for store in stores:
        try:
            slide = open_patch_store(store).attrs["slide_path"]
        except (ValueError, KeyError) as error:
            _fail(f"patch store {store}: {error}")
        if slide not in image_of_path:
            _fail(f"patch store {store}: its slide {slide} is not in {manifest_path}")
        image_ids.append(image_of_path[slide])
    features, ssl = settings["features"], settings["ssl"]
    extract = ExtractSettings(
        backbone=ssl["backbone"],
        mean=tuple(ssl["augment"]["mean"]),
        std=tuple(ssl["augment"]["std"]),
        **{
            k: features[k]
            for k in ("image_px", "batch_size", "workers", "amp", "channels_last", "device")
        },
    )
    duplicated = sorted({i for i in image_ids if image_ids.count(i) > 1})
    if duplicated:
        _fail(f"several patch stores belong to the slide(s) {duplicated}")
    try:
        extract_cohort_features(stores, image_ids, weights, extract, out_dir=out_dir)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))


@app.command("cluster-features")
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
    from mmdiag.data.manifest import read_manifest
    from mmdiag.features.phenotypes import cluster_patients
    from mmdiag.io import write_tsv

    settings = _settings(config, settings_json)["features"]
    manifest = read_manifest(manifest_path)
    patient_of_image = dict(zip(manifest["image_id"], manifest["patient_id"], strict=True))
    try:
        table = cluster_patients(
            _feature_store_paths(stores),
            patient_of_image,
            n_clusters=settings["n_clusters"],
            seed=settings["cluster_seed"],
        )
    except ValueError as error:
        _fail(str(error))
    write_tsv(table, out)
    log.info("%s: %d patches of %d patients", out, len(table), table["patient_id"].nunique())


@app.command("csmil-train")
def csmil_train(
    method: MethodName,
    variant: Annotated[str, typer.Option(help="Variant name (a key of the method's variants).")],
    fold: Annotated[int, typer.Option(help="Split number.")],
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    clusters: Annotated[Path, typer.Option(help="clusters.tsv of the cohort.")],
    features: Annotated[
        list[Path], typer.Argument(help="The cohort's feature stores (.zarr), or their folder.")
    ],
    out_dir: Annotated[Path, typer.Option(help="Fold folder to write.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train and test one CS-MIL variant on one split (bags from phenotype clusters)."""
    from mmdiag.training.csmil_fold import run_csmil_fold

    settings = _settings(config, settings_json)
    method_settings, _ = _variant_settings(settings, method, variant)
    try:
        run_csmil_fold(
            manifest_path=manifest_path,
            splits_path=splits_path,
            feature_paths=_feature_store_paths(features),
            clusters_path=clusters,
            fold=fold,
            variant=variant,
            method=method,
            method_settings=method_settings,
            classes=_cohort_manifest_rules(settings, method_settings["cohort"])["classes"],
            out_dir=out_dir,
        )
    except ValueError as error:
        _fail(str(error))


@app.command("csmil-figures")
def csmil_figures(
    method: MethodName,
    results: Annotated[Path, typer.Option(help="The method's results folder.")],
    manifest_path: ManifestPath,
    features: Annotated[Path, typer.Option(help="The cohort's features folder.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the PNG figures.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """ROC/PR curves of every variant, attention maps and scale-attention box plots."""
    from mmdiag.data.manifest import read_manifest
    from mmdiag.reporting.csmil_figures import write_csmil_figures

    method_settings = _method_settings(_settings(config, settings_json), method)
    try:
        written = write_csmil_figures(
            results, method_settings, read_manifest(manifest_path), features, out_dir
        )
    except ValueError as error:
        _fail(str(error))
    log.info("%s: %d figures in %s", method, len(written), out_dir)


@app.command("csmil-toy-table")
def csmil_toy_table(
    micro: Annotated[Path, typer.Option(help="fold_all.tsv of the micro-anomaly method.")],
    macro: Annotated[Path, typer.Option(help="fold_all.tsv of the macro-anomaly method.")],
    method: MethodName,
    out_dir: Annotated[Path, typer.Option(help="Folder for table5.md/.tex/.tsv.")],
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """CS-MIL's Table 5: AUC and AP of every variant on both toy datasets."""
    from mmdiag.reporting.toy_table import write_toy_table

    method_settings = _method_settings(_settings(config, settings_json), method)
    written = write_toy_table(micro, macro, method_settings, out_dir)
    log.info("toy benchmark table:\n%s", written[0].read_text())


if __name__ == "__main__":
    app()
