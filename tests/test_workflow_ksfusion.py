"""A real Snakemake run of the subspace-fusion chain on a tiny glioma cohort: synthetic SVS
slides (one or two tissue samples per patient) with expression profiles -> manifest -> one
holdout split with two seeds -> patches -> SSL encoders -> features -> every Table 1 and 2 row
trained per task (diagnosis, grading, survival) -> tables and figures."""

import json

import pandas as pd
import pytest
import yaml

from tests.test_workflow import copy_workflow, run_tiny_dag

TINY = {
    "cohorts": {"glioma_demo": {"glioma": {"n_patients": 24, "slide_px": 768}}},
    "patching": {"workers": 1},
    "splits": {"schemes": {"ksfusion_holdout": {"n_seeds": 2, "fractions": [0.6, 0.2, 0.2]}}},
}
VARIANTS = ["attmil", "snn", "bilinear", "mcat", "cmta", "ours", "wo_cgcoord", "alpha_0"]
TARGETS = ["results/ksfusion/tables", "results/ksfusion/figures", "results/ksfusion/stats.tsv"]


def _tiny_method(path):
    """Some rows of each kind, a few epochs, a 3 x 3 grid (the copy only)."""
    settings = yaml.safe_load(path.read_text())
    method = settings["methods"]["ksfusion"]
    method["variants"] = {v: method["variants"][v] for v in VARIANTS}
    method["slides"] = {"n_patches": 9, "grid_cells": [3, 3]}
    method["train"] = {"classification": {"epochs": 3, "device": "cpu"},
                       "survival": {"epochs": 2, "device": "cpu"}}  # fmt: skip
    method["tables"]["table1"]["rows"] = ["attmil", "snn", "bilinear", "mcat", "cmta", "ours"]
    method["tables"]["table2"]["rows"] = ["wo_cgcoord", "ours"]
    method["figures"] = {"roc": ["snn", "ours"], "alpha": ["alpha_0", "ours"]}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


@pytest.fixture(scope="module")
def ksfusion_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ksfusion_workflow")
    copy_workflow(workdir)
    _tiny_method(workdir / "config/methods/ksfusion.yaml")
    return workdir, run_tiny_dag(workdir, TINY, TARGETS, timeout=900)


@pytest.mark.integration
def test_every_row_is_trained_per_task_and_tested_per_tissue_sample(ksfusion_run):
    workdir, _ = ksfusion_run
    results = workdir / "results"
    manifest = pd.read_csv(results / "glioma_demo/manifest.tsv", sep="\t")
    slides_of = manifest.groupby("patient_id")["image_id"].count()
    assert slides_of.max() >= 2  # some patients have two tissue samples
    fold_all = pd.read_csv(results / "ksfusion/fold_all.tsv", sep="\t")
    assert set(fold_all["variant"]) == set(VARIANTS) and set(fold_all["fold"]) == {0, 1}
    assert {"diagnosis/AUC", "grading/F1", "survival/C-index"} <= set(fold_all["metric"])
    splits = json.loads((results / "glioma_demo/splits/ksfusion_holdout.json").read_text())
    for fold in (0, 1):
        tested = {}
        for variant in VARIANTS:
            frame = pd.read_csv(
                results / f"ksfusion/{variant}/fold_{fold}/predictions.tsv", sep="\t"
            )
            assert set(frame["task"]) == {"diagnosis", "grading", "survival"}
            tested[variant] = sorted(frame.loc[frame["task"] == "diagnosis", "sample_id"])
        assert all(ids == tested["ours"] for ids in tested.values())
        # every slide of the test patients, and nothing else
        test_patients = set(splits["folds"][fold]["test"])
        expected = manifest[manifest["patient_id"].isin(test_patients)]["image_id"]
        assert tested["ours"] == sorted(i.split("/")[-1] for i in expected)
        survival = frame[frame["task"] == "survival"]
        assert {"time", "event", "risk"} <= set(survival.columns)
    genes = pd.read_csv(results / "ksfusion/ours/fold_0/genes.tsv", sep="\t")
    assert genes["tumour"].sum() > 0 and genes["microenvironment"].sum() > 0
    log = pd.read_csv(results / "ksfusion/ours/fold_0/train_log.tsv", sep="\t")
    assert {"val_loss", "val_cindex"} <= set(log.columns) and set(log["task"]) == {
        "diagnosis",
        "grading",
        "survival",
    }


@pytest.mark.integration
def test_tables_and_figures_are_written(ksfusion_run):
    workdir, _ = ksfusion_run
    table = (workdir / "results/ksfusion/tables/table1.md").read_text()
    assert "Bilinear" in table and "Ours" in table and "survival/C-index" in table
    figures = workdir / "results/ksfusion/figures"
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "alpha.png",
        "roc_diagnosis.png",
        "roc_grading.png",
    ]
    alpha = pd.read_csv(figures / "alpha.tsv", sep="\t")
    assert sorted(set(alpha["alpha"])) == [0.0, 0.5]
