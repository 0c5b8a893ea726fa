"""``mmdiag cmus ...``: CMUS-Net's stages (OM segmentation, per-fold training, votes, figures).

``--method`` names a configured method of the family (``cmus``, ``cmus_staging`` ...).
"""

from __future__ import annotations

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

FAMILY = "cmus"
app = typer.Typer(
    help="CMUS-Net: OM glomerulus segmentation, per-fold training, late votes, figures.",
    no_args_is_help=True,
)
Method = Annotated[str, typer.Option("--method", help="A configured CMUS-family method.")]
GlomeruliPath = Annotated[
    Path | None,
    typer.Option("--glomeruli", help="glomeruli.tsv of the segmentation step (OM crops)."),
]


@app.command(
    epilog=examples(
        "mmdiag cmus segment --manifest results/demo/manifest.tsv --out-dir glomeruli",
    )
)
def segment(
    manifest_path: ManifestPath,
    out_dir: Annotated[Path, typer.Option(help="Folder for masks/, qc/ and glomeruli.tsv.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Segment the glomerulus of every OM image: SAM with a checkpoint, else classical masks."""
    from mmdiag.methods.cmus.segmentation import segment_glomeruli

    settings = load_settings(config, settings_json)
    segment_glomeruli(
        manifest_path, out_dir, method_settings(settings, method, FAMILY)["segmentation"]
    )


@app.command(
    epilog=examples(
        "mmdiag cmus train --variant cmus_net --fold 0 --manifest results/demo/manifest.tsv "
        "--splits results/demo/splits/kfold5.json --out fold_0",
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
    glomeruli: GlomeruliPath = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train one variant on one fold; write checkpoint, predictions, metrics, log and config."""
    from mmdiag.methods.cmus.fold import run_cmus_fold
    from mmdiag.methods.cmus.settings import is_vote

    settings = load_settings(config, settings_json)
    chosen, variant_spec = variant_settings(settings, method, variant, FAMILY)
    set_torch_threads(threads or chosen["train"].get("num_threads", 0))
    if is_vote(variant_spec):
        fail(f"variant {variant!r} is a late vote: run `mmdiag cmus vote`, not `train`")
    run_cmus_fold(
        manifest_path=manifest_path,
        splits_path=splits_path,
        fold=fold,
        variant=variant,
        method_settings=chosen,
        manifest_rules=method_manifest_rules(settings, method),
        out_dir=out,
        method=method,
        glomeruli_path=glomeruli,
    )


@app.command(
    epilog=examples(
        "mmdiag cmus vote --variant late_vote --fold 0 --out late_vote/fold_0 "
        "results/cmus/om/fold_0/predictions.tsv results/cmus/im/fold_0/predictions.tsv "
        "results/cmus/tem/fold_0/predictions.tsv",
    )
)
@reports_errors()
def vote(
    variant: Annotated[str, typer.Option(help="A late_vote variant.")],
    fold: FoldIndex,
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    members: Annotated[
        list[Path], typer.Argument(help="predictions.tsv of each member variant, this fold.")
    ],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Late fusion: majority vote of trained variants' predictions on one fold (no training)."""
    from mmdiag.methods.cmus.fold import run_vote_fold

    settings = load_settings(config, settings_json)
    chosen, variant_spec = variant_settings(settings, method, variant, FAMILY)
    names = variant_spec["members"]
    if len(members) != len(names):
        fail(f"variant {variant!r} votes over {names}; got {len(members)} prediction files")
    run_vote_fold(
        member_predictions=dict(zip(names, members, strict=True)),
        fold=fold,
        variant=variant,
        method_settings=chosen,
        manifest_rules=method_manifest_rules(settings, method),
        out_dir=out,
        method=method,
    )


@app.command(
    epilog=examples(
        "mmdiag cmus figures --results results/cmus --manifest results/demo/manifest.tsv "
        "--splits results/demo/splits/kfold5.json --out-dir figures",
    )
)
@reports_errors()
def figures(
    results: Annotated[Path, typer.Option(help="The method's results folder (results/{method}).")],
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    out_dir: Annotated[Path, typer.Option(help="Folder for the PNG figures.")],
    method: Method = FAMILY,
    glomeruli: GlomeruliPath = None,
    fold: Annotated[int, typer.Option(help="Fold whose model t-SNE and Grad-CAM explain.")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """ROC curves, confusion matrices, t-SNE, Grad-CAM and the batch-size/loss-weight plots."""
    import logging

    from mmdiag.methods.cmus.figures import write_cmus_figures

    settings = load_settings(config, settings_json)
    written = write_cmus_figures(
        method=method,
        method_settings=method_settings(settings, method, FAMILY),
        manifest_rules=method_manifest_rules(settings, method),
        results_dir=results,
        manifest_path=manifest_path,
        splits_path=splits_path,
        out_dir=out_dir,
        glomeruli_path=glomeruli,
        explain_fold=fold,
    )
    logging.getLogger("mmdiag").info("%s: %d figures in %s", method, len(written), out_dir)


#: The commands' names before they moved under ``mmdiag cmus`` (hidden; kept one release).
ALIASES = {"segment": segment, "train": train, "vote": vote, "figures": figures}
