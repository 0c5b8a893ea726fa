"""The Snakemake workflow: lint, formatting, and a real run of the DAG on a tiny cohort."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from mmdiag.evaluation.metrics import CLASSIFICATION_METRICS
from mmdiag.training.fold_outputs import fold_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "envs")

TINY_CONFIG = {
    "synth": {
        "seed": 3,
        "n_patients": 12,
        "om_size_px": [96, 64],
        "im_size_px": [96, 64],
        "tem_size_px": 64,
        "tem_legend_px": 4,
        "tem_per_patient": [2, 3],
        "wsi": {
            "n_patients": 1,
            "width_px": 512,
            "height_px": 512,
            "n_levels": 3,
            "downsample": 2,
            "tile_px": 128,
        },
        "ct": {"n_patients": 1, "shape_vox": [16, 16, 8]},
        "genes": {"n_genes": 20, "tumour_set_size": 4, "microenvironment_set_size": 6},
    },
    "manifest": {"min_image_px": {"OM": 32, "IM": 32, "TEM": 32, "WSI": 128, "CT": 8}},
    "patching": {"patch_px": 64, "workers": 1, "thumbnail_mpp": 4.0},
    "splits": {"schemes": {"kfold3": {"type": "kfold", "n_folds": 3, "label": "disease"}}},
    "methods": {
        "cmus": {
            "split": "kfold3",
            "preprocess": {"image_size_px": 32, "tem_legend_px": 4},
            "train": {"epochs": 2, "batch_size": 4},
        }
    },
}


def copy_workflow(workdir: Path) -> None:
    """Copy what Snakemake reads (Snakefile, rules, config, envs) into ``workdir``."""
    for name in WORKFLOW_FILES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, workdir / name)


def _run(command, cwd, timeout=600):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_tiny_dag(workdir: Path, tiny_config: dict, targets, timeout: int = 600) -> list[str]:
    """Run Snakemake (2 cores) on ``targets`` in a workflow copy with ``tiny_config`` as
    ``tiny.yaml``; fail with the logs' tail unless it succeeds; return the command."""
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_config))
    command = [
        str(BIN / "snakemake"),
        "--cores",
        "2",
        "--configfile",
        "tiny.yaml",
        "--show-failed-logs",
        *targets,
    ]
    result = _run(command, workdir, timeout=timeout)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return command


def test_snakemake_lint_is_clean():
    result = _run([str(BIN / "snakemake"), "--lint"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_snakefmt_check_passes():
    result = _run([str(BIN / "snakefmt"), "--check", "."], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_invalid_config_stops_snakemake_with_the_key(tmp_path):
    copy_workflow(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"methods": {"cmus": {"task": "grading"}}}))
    result = _run([str(BIN / "snakemake"), "-n", "--configfile", "bad.yaml"], tmp_path)
    assert result.returncode != 0
    assert "methods.cmus.task: 'grading' is not allowed" in result.stdout + result.stderr


def test_a_target_of_an_unknown_cohort_names_the_configured_ones(tmp_path):
    copy_workflow(tmp_path)
    result = _run([str(BIN / "snakemake"), "-n", "results/realx/manifest.tsv"], tmp_path)
    assert result.returncode != 0
    assert "unknown cohort 'realx' in a target" in result.stdout + result.stderr
    assert (
        "configured cohorts: ['demo', 'glioma_demo', 'radpath_demo', 'tet_demo', 'toy_macro'"
        in result.stdout + result.stderr
    )


def test_a_predefined_split_table_is_an_input_of_the_splits_rule(tmp_path):
    """The partition table is tracked: a missing one stops the DAG, naming it; with it the DAG
    of a method on the predefined split resolves."""
    copy_workflow(tmp_path)
    scheme = {"type": "predefined", "path": "my_splits.tsv", "n_seeds": 3}
    override = {"splits": {"schemes": {"mine": scheme}}, "methods": {"cmus": {"split": "mine"}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(override))
    command = [str(BIN / "snakemake"), "-n", "results/demo/splits/mine.json"]
    result = _run([*command, "--configfile", "mine.yaml"], tmp_path)
    assert result.returncode != 0
    assert "my_splits.tsv" in result.stdout + result.stderr

    rows = [
        f"P{i:03d}\t{part}\t{repeat}"
        for repeat in (0, 1)
        for i, part in enumerate(("train", "test"))
    ]
    (tmp_path / "my_splits.tsv").write_text("patient_id\tpart\trepeat\n" + "\n".join(rows) + "\n")
    result = _run(
        [str(BIN / "snakemake"), "-n", "results/cmus/fold_all.tsv", "--configfile", "mine.yaml"],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "results/demo/splits/mine.json" in result.stdout


TINY_VARIANTS = {
    "cmus_net": {"model": "cmus_net", "encoder": "test_resnet"},
    "none": {
        "model": "cmus_net",
        "encoder": "test_resnet",
        "smil": False,
        "fusion_attention": "none",
        "weighted_loss": False,
    },
    "om": {"model": "cmus_net", "encoder": "test_resnet", "modalities": ["OM"]},
    "tem": {"model": "cmus_net", "encoder": "test_resnet", "modalities": ["TEM"]},
    "late_vote": {"model": "late_vote", "members": ["om", "tem"]},
}
TINY_TABLES = {
    "table2": {"title": "Ablation", "rows": ["none", "cmus_net"]},
    "table3": {
        "title": "Modalities",
        "rows": ["om", "tem", "late_vote", "cmus_net"],
        "labels": {"late_vote": "OM, TEM (late vote)"},
    },
}
TRAINED = ("cmus_net", "none", "om", "tem")
CLASSES = ("IgAN", "MN", "LN")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the real DAG (fold_all.tsv, tables, figures) in a temporary copy of the workflow.

    The copy's config/methods/cmus.yaml keeps five of the demo's variants, so that the run
    covers training, the late vote, both tables and the figures in about a minute.
    """
    workdir = tmp_path_factory.mktemp("workflow")
    copy_workflow(workdir)
    method_file = workdir / "config/methods/cmus.yaml"
    methods = yaml.safe_load(method_file.read_text())
    methods["methods"]["cmus"] |= {"variants": TINY_VARIANTS, "tables": TINY_TABLES}
    method_file.write_text(yaml.safe_dump(methods, sort_keys=False))
    targets = [
        "results/cmus/fold_all.tsv",
        "results/cmus/tables",
        "results/cmus/figures",
        "results/demo/patches/index.tsv",
    ]
    return workdir, run_tiny_dag(workdir, TINY_CONFIG, targets)


@pytest.mark.integration
def test_dag_outputs_are_complete_and_consistent(tiny_run):
    workdir, _ = tiny_run
    results = workdir / "results"
    manifest = pd.read_csv(results / "demo/manifest.tsv", sep="\t")
    patients = set(manifest["patient_id"])
    assert len(patients) == 12

    splits = json.loads((results / "demo/splits/kfold3.json").read_text())
    assert len(splits["folds"]) == 3

    fold_all = pd.read_csv(results / "cmus/fold_all.tsv", sep="\t")
    assert list(fold_all.columns) == ["method", "variant", "fold", "metric", "value"]
    metrics = {"ACC", "AUC", "PRE", "REC", "SPE", "F1"}
    for variant in TINY_VARIANTS:
        rows = fold_all[fold_all["variant"] == variant]
        assert set(rows["fold"]) == {0, 1, 2}
        assert all(set(group["metric"]) == metrics for _, group in rows.groupby("fold"))
    assert len(fold_all) == len(TINY_VARIANTS) * 3 * 6
    assert fold_all["value"].between(0, 1).all()

    for variant in TINY_VARIANTS:
        predictions = pd.concat(
            pd.read_csv(results / f"cmus/{variant}/fold_{k}/predictions.tsv", sep="\t")
            for k in range(3)
        )
        # every patient predicted exactly once per variant across the folds
        assert sorted(predictions["patient_id"]) == sorted(patients)
        prob = predictions[[f"prob_{c}" for c in CLASSES]]
        assert (prob.sum(axis=1) - 1).abs().max() < 1e-5
        for k in range(3):  # every variant's metrics follow from its predictions, votes too
            fold = predictions[predictions["fold"] == k]
            written = pd.read_csv(results / f"cmus/{variant}/fold_{k}/metrics.tsv", sep="\t")
            recomputed = fold_metrics(fold, CLASSES, CLASSIFICATION_METRICS)
            for metric, value in written.set_index("metric")["value"].items():
                assert value == pytest.approx(recomputed[metric], nan_ok=True), (variant, k)
        fold_dir = results / f"cmus/{variant}/fold_0"
        resolved = yaml.safe_load((fold_dir / "config.yaml").read_text())
        assert resolved["variant"] == variant
        if variant not in TRAINED:
            assert not (fold_dir / "model.safetensors").exists()
            continue
        assert (prob.to_numpy().argmax(1) == predictions["y_pred"]).all()
        assert len(pd.read_csv(fold_dir / "train_log.tsv", sep="\t")) == 2  # epochs
        weights = load_file(str(fold_dir / "model.safetensors"))
        modalities = {key.split(".")[1] for key in weights if key.startswith("encoders.")}
        expected = {"om": {"OM"}, "tem": {"TEM"}}.get(variant, {"OM", "IM", "TEM"})
        assert modalities == expected
        assert len(resolved["inputs"]["glomeruli"]["sha256"]) == 64  # trained on OM crops


@pytest.mark.integration
def test_dag_segments_every_om_image(tiny_run):
    workdir, _ = tiny_run
    folder = workdir / "results/demo/masks/glomerulus"
    table = pd.read_csv(folder / "glomeruli.tsv", sep="\t")
    assert len(table) == 12 and set(table["method"]) == {"classical"}  # no SAM checkpoint
    assert (table["crop_x1"] > table["crop_x0"]).all() and (
        table["crop_y1"] > table["crop_y0"]
    ).all()
    assert len(list((folder / "qc").rglob("*.png"))) == 12
    assert "SAM" in (workdir / "logs/cmus_segment/demo.log").read_text()


@pytest.mark.integration
def test_dag_writes_the_paper_tables_and_figures(tiny_run):
    workdir, _ = tiny_run
    results = workdir / "results/cmus"
    table3 = (results / "tables/table3.md").read_text()
    assert "| OM, TEM (late vote) |" in table3 and table3.count("| Ref. |") == 1
    assert "p-value (paired_ttest)" in table3
    stats = pd.read_csv(results / "stats.tsv", sep="\t")
    assert sorted(set(stats[stats["table"] == "table3"]["variant"])) == ["late_vote", "om", "tem"]
    assert set(stats["test"]) == {"paired_ttest", "wilcoxon"} and (stats["n"] == 3).all()
    summary = pd.read_csv(results / "summary.tsv", sep="\t")
    assert len(summary) == len(TINY_VARIANTS) * 6 and (summary["n_folds"] == 3).all()
    assert (results / "tables/table2.tex").read_text().startswith("\\begin{table}")
    pictures = {p.name for p in (results / "figures").glob("*.png")}
    assert {"roc_cmus_net.png", "confusion_cmus_net.png", "tsne.png"} <= pictures
    assert any(name.startswith("grad_cam_") for name in pictures)


@pytest.mark.integration
def test_dag_patches_every_slide(tiny_run):
    from mmdiag.patching.store import open_patch_store

    workdir, _ = tiny_run
    index = pd.read_csv(workdir / "results/demo/patches/index.tsv", sep="\t")
    assert len(index) == 1 and (index["n_patches"] > 0).all()  # the tiny cohort has one slide
    store = open_patch_store(workdir / index["store"].iloc[0])
    assert store.scales == ["20x", "10x", "5x"]
    assert store.pixels("5x", 0).shape == (64, 64, 3)
    assert store.attrs["mpp_source"] == "metadata"
    assert (workdir / "results/demo/masks/tissue/wsi").is_dir()


@pytest.mark.integration
def test_finished_dag_has_nothing_left_to_do(tiny_run):
    workdir, command = tiny_run
    result = _run([*command, "--dry-run"], workdir)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.integration
def test_report_opens_in_a_browser_with_every_table_and_picture(tiny_run, tmp_path):
    """The Snakemake report of the tiny run, opened in headless Chromium: first of a partial
    run (CS-MIL is configured but did not run), then with the overview page, which the run of
    the one configured method makes."""
    from tests.report_browser import browser_available, inspect_report

    if (reason := browser_available()) is not None:
        pytest.skip(reason)
    workdir, command = tiny_run
    report = [str(BIN / "snakemake"), "--report", "report.html"]
    tiny = ["--configfile", "tiny.yaml"]  # after the targets: it takes several values
    result = _run([*report, "results/cmus/tables", "results/cmus/figures", *tiny], workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    view = inspect_report(workdir / "report.html", screenshot=tmp_path / "report.png")
    assert view.severe_console_errors == []
    assert "Overview" not in view.categories and "cmus" in view.categories
    table3 = view.result_named("table3.html")
    (rendered,) = view.html_tables[table3.key]
    assert rendered[0][0] == "Variant" and rendered[0][-1] == "p-value (paired_ttest)"
    assert [row[0] for row in rendered[1:]] == ["om", "tem", "OM, TEM (late vote)", "cmus_net"]
    assert sum(row[-1] == "Ref." for row in rendered) == 1
    caption = " ".join(table3.caption.split())
    assert caption.startswith("Table table3 of cmus:") and "Ref. (cmus_net)" in caption
    assert "split scheme kfold3" in caption
    pictures = [key for key, r in view.results.items() if r.mime_type.startswith("image/")]
    assert any(view.results[key].name == "roc_cmus_net.png" for key in pictures)
    assert all(min(view.image_sizes[key]) > 0 for key in pictures), view.image_sizes
    assert view.screenshot is not None and view.screenshot.stat().st_size > 1000

    # the overview of a run of CMUS-Net only: the other methods' files set aside
    others = [p for p in (workdir / "config/methods").glob("*.yaml") if p.name != "cmus.yaml"]
    for path in others:
        path.rename(tmp_path / path.name)
    try:
        result = _run(
            [str(BIN / "snakemake"), "--cores", "1", "results/overview.html", *tiny],
            workdir,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        result = _run([*report, "results/overview.html", "results/cmus/tables", *tiny], workdir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        for path in others:
            (tmp_path / path.name).rename(path)
    view = inspect_report(workdir / "report.html")
    assert view.severe_console_errors == []
    assert "Overview" in view.categories
    overview = view.result_named("overview.html")
    methods_table = view.html_tables[overview.key][0]
    cmus_row = next(row for row in methods_table if row[0] == "cmus")
    assert cmus_row[5:7] == ["cmus_net", "AUC"] and cmus_row[8] == "0.9905 (Table 2)"
    assert cmus_row[7].endswith("(3 folds)")


#: Synthetic stand-ins for the paper configs' own cohorts, so that their whole DAG resolves.
PAPER_STAND_INS = {
    "cmus": {"renal": {"synthetic": True}},
    "mhd": {"rptet": {"synthetic": True, "generator": "tet", "tet": {"n_patients": 16}}},
    "guide": {
        "radpath": {"synthetic": True, "generator": "radpath", "radpath": {"n_patients": 12}}
    },
    "ksfusion": {
        "gbmlgg": {"synthetic": True, "generator": "glioma", "glioma": {"n_patients": 12}}
    },
    "csmil": {
        name: {"synthetic": True, "generator": "toy_mil", "toy": toy}
        for name, toy in (
            ("cd", {"kind": "micro", "n_slides": 8, "n_sites": 4, "seed": 1}),
            ("tcga_gbmlgg", {"kind": "macro", "n_slides": 8, "n_sites": 4, "seed": 2}),
        )
    },
}


@pytest.mark.parametrize("family", sorted(PAPER_STAND_INS))
def test_the_paper_dag_schedules_every_table_row_on_every_fold(tmp_path, family):
    """`snakemake -n all` on `config/paper/<family>.yaml` with its cohorts replaced by
    synthetic ones: every row of every table of the family's methods has a job (training, or
    a late vote) on every fold of its split."""
    from mmdiag.cli_support import default_config_files
    from mmdiag.config import load_config
    from mmdiag.data.splits import scheme_fold_count

    copy_workflow(tmp_path)
    paper = f"config/paper/{family}.yaml"
    (tmp_path / "stand_in.yaml").write_text(yaml.safe_dump({"cohorts": PAPER_STAND_INS[family]}))
    result = _run(
        [str(BIN / "snakemake"), "-n", "all", "--configfile", paper, "stand_in.yaml"], tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = rf"wildcards: method=({family}\w*), variant=(\w+), fold=(\d+)"
    scheduled = set(re.findall(job, result.stdout))
    config = load_config([*default_config_files(tmp_path), tmp_path / paper])
    methods = {m: s for m, s in config["methods"].items() if s.get("family", m) == family}
    assert methods, family
    checked = 0
    for method, settings in methods.items():
        n_folds = scheme_fold_count(config["splits"]["schemes"][settings["split"]])
        for row in {row for table in settings["tables"].values() for row in table["rows"]}:
            folds = {int(k) for m, v, k in scheduled if (m, v) == (method, row)}
            assert folds == set(range(n_folds)), (method, row, sorted(folds))
            checked += 1
    assert checked >= 10, checked  # not vacuous: every paper config has many rows
