"""``mmdiag mhd ...``: MHD-Net's stages (per-fold training of teachers, students, the CT
baseline and the comparison methods; figures).

``--method`` names a configured method of the family (``mhd`` ...).
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
from mmdiag.methods.mhd.kinds import TEACHER_READERS

FAMILY = "mhd"
app = typer.Typer(
    help="MHD-Net: CT + WSI teachers, CT-only students and the CT baseline per fold; figures.",
    no_args_is_help=True,
)
log = logging.getLogger("mmdiag")
Method = Annotated[str, typer.Option("--method", help="A configured MHD-Net-family method.")]
PatchesDir = Annotated[
    Path, typer.Option("--patches", help="The cohort's patch stores (results/{cohort}/patches).")
]


@app.command(
    epilog=examples(
        "mmdiag mhd train --variant teacher --fold 0 --manifest results/tet_demo/manifest.tsv "
        "--splits results/tet_demo/splits/mhd_holdout.json --patches results/tet_demo/patches "
        "--out results/mhd/teacher/fold_0",
        "mmdiag mhd train --variant mhd_net --fold 0 --manifest results/tet_demo/manifest.tsv "
        "--splits results/tet_demo/splits/mhd_holdout.json --patches results/tet_demo/patches "
        "--teacher results/mhd/teacher/fold_0/model.safetensors --out results/mhd/mhd_net/fold_0",
    )
)
@reports_errors()
def train(
    variant: VariantName,
    fold: FoldIndex,
    manifest_path: ManifestPath,
    splits_path: SplitsPath,
    patches: PatchesDir,
    out: Annotated[Path, typer.Option(help="Fold output folder.")],
    method: Method = FAMILY,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="A student's (or sckd's) teacher: that variant's model.safetensors, same fold."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Train one variant on one fold; write checkpoint, predictions, metrics, log and config."""
    from mmdiag.methods.mhd.fold import run_mhd_fold

    settings = load_settings(config, settings_json)
    chosen, spec = variant_settings(settings, method, variant, FAMILY)
    set_torch_threads(threads or chosen["train"].get("num_threads", 0))
    if spec["model"] in TEACHER_READERS and teacher is None:
        fail(f"variant {variant!r} is a {spec['model']} of {spec['teacher']!r}: give --teacher")
    run_mhd_fold(
        manifest_path=manifest_path,
        splits_path=splits_path,
        patches_dir=patches,
        fold=fold,
        variant=variant,
        method_settings=chosen,
        manifest_rules=method_manifest_rules(settings, method),
        out_dir=out,
        method=method,
        teacher_checkpoint=teacher,
    )


@app.command(
    epilog=examples(
        "mmdiag mhd figures --results results/mhd --out-dir results/mhd/figures",
    )
)
@reports_errors()
def figures(
    results: Annotated[Path, typer.Option(help="The method's results folder (results/{method}).")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the PNG figures.")],
    method: Method = FAMILY,
    config: ConfigFiles = None,
    settings_json: SettingsJson = None,
) -> None:
    """Teacher ROC curves per type and branch (Fig. 5), student confusion matrices (Fig. 6),
    the loss-weight sweeps and the parameter counts (Fig. 7)."""
    from mmdiag.methods.mhd.figures import write_mhd_figures

    settings = load_settings(config, settings_json)
    written = write_mhd_figures(
        method=method,
        method_settings=method_settings(settings, method, FAMILY),
        manifest_rules=method_manifest_rules(settings, method),
        results_dir=results,
        out_dir=out_dir,
    )
    log.info("%s: %d figures in %s", method, len(written), out_dir)
