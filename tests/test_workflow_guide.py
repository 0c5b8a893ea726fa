"""A real Snakemake run of the DeepGuide chain on a tiny RadPath-like cohort: synthetic NIfTI
MR sequences and SVS slides -> manifest -> repeated splits -> patches -> SSL encoders ->
features -> superior (CLAM) and inferior (3D DenseNet) classifiers -> guidance, guided,
control and fusion heads on their latents -> tables (McNemar) and figures."""

import pandas as pd
import pytest
import yaml

from tests.test_workflow import copy_workflow, run_tiny_dag

TINY = {
    "cohorts": {"radpath_demo": {"radpath": {"n_patients": 18, "slide_px": 512}}},
    "patching": {"workers": 1},
    "splits": {"schemes": {"guide_repeated": {"n_repeats": 2}}},
}
VARIANTS = {
    "p": {"model": "superior"},
    "r_all": {"model": "inferior", "sequence": "all"},
    "g_all": {"model": "guidance", "inferior": "r_all", "superior": "p"},
    "gr_all": {"model": "guided", "guidance": "g_all"},
    "rh_all": {"model": "retrained_head", "inferior": "r_all"},
    "pr_all": {"model": "fusion", "inferior": "r_all", "superior": "p"},
}
TARGETS = ["results/guide/tables", "results/guide/figures", "results/guide/stats.tsv"]


def _tiny_method(path):
    """The ALL column's six rows, few epochs (the copy only)."""
    settings = yaml.safe_load(path.read_text())
    method = settings["methods"]["guide"]
    method["variants"] = VARIANTS
    for recipe in ("superior", "inferior"):
        method["train"][recipe] |= {"epochs": 3, "patience": 3}
    method["train"]["guidance"] = {"epochs": 20, "device": "cpu"}
    method["train"]["guided"] |= {"epochs": 30, "patience": 30}
    method["train"]["fusion"] |= {"epochs": 30, "patience": 30}
    del method["tables"]["table1_t1ce"]
    method["figures"] = {
        "improvement": {"ALL": {"baseline": "r_all", "guided": "gr_all"}},
        "confusion": ["gr_all"],
    }
    method["headline"] = None
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def _predictions(results, variant, fold):
    return pd.read_csv(results / f"guide/{variant}/fold_{fold}/predictions.tsv", sep="\t")


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guide_workflow")
    copy_workflow(workdir)
    _tiny_method(workdir / "config/methods/guide.yaml")
    return workdir, run_tiny_dag(workdir, TINY, TARGETS, timeout=900)


@pytest.mark.integration
def test_every_row_is_trained_on_every_split_and_tested_on_the_same_patients(guide_run):
    workdir, _ = guide_run
    results = workdir / "results"
    manifest = pd.read_csv(results / "radpath_demo/manifest.tsv", sep="\t")
    assert manifest.groupby("modality")["image_id"].count().to_dict() == {"MR": 72, "WSI": 18}
    fold_all = pd.read_csv(results / "guide/fold_all.tsv", sep="\t")
    assert set(fold_all["variant"]) == set(VARIANTS) and set(fold_all["fold"]) == {0, 1}
    assert set(fold_all["metric"]) == {"BACC", "microF1", "AUC"}
    for fold in (0, 1):
        tested = {v: sorted(_predictions(results, v, fold)["patient_id"]) for v in VARIANTS}
        assert all(ids == tested["r_all"] for ids in tested.values()), tested
    for image_kind in ("p", "r_all"):
        ids = pd.read_csv(results / f"guide/{image_kind}/fold_0/latents.tsv", sep="\t")
        assert len(ids) == 18  # every patient of the split: train, validation and test
    stats = pd.read_csv(results / "guide/stats.tsv", sep="\t")
    assert set(stats["test"]) == {"mcnemar"}
    # every row against R (Table 1), and G(R) + R against the retrained-head control
    compared = set(zip(stats["variant"], stats["reference"], strict=True))
    assert ("gr_all", "r_all") in compared and ("gr_all", "rh_all") in compared


@pytest.mark.integration
def test_tables_and_figures_are_written(guide_run):
    workdir, _ = guide_run
    table = (workdir / "results/guide/tables/table1_all.md").read_text()
    assert "G(R) + R" in table and "R + retrained head (control)" in table and "P + R" in table
    figures = workdir / "results/guide/figures"
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "confusion_gr_all.png",
        "improvement.png",
    ]
    improvement = pd.read_csv(figures / "improvement.tsv", sep="\t")
    assert list(improvement["metric"]) == ["BACC", "microF1"]
    row = improvement.iloc[0]
    assert row["change_percent"] == pytest.approx(
        100 * (row["guided"] - row["baseline"]) / row["baseline"]
    )
