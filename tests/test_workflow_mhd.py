"""A real Snakemake run of the MHD-Net chain on a tiny thymic tumour cohort: synthetic NIfTI
CTs and SVS slides -> manifest -> patient-level holdout -> patches -> teacher, student and CT
baseline -> tables and figures."""

import pandas as pd
import pytest
import yaml

from tests.test_workflow import _run, copy_workflow, run_tiny_dag

TINY = {
    "cohorts": {"tet_demo": {"tet": {"n_patients": 16, "slides_per_patient": 1}}},
    "patching": {"workers": 1},
}
VARIANTS = {
    "teacher": {"model": "teacher"},
    "mhd_net": {"model": "student", "teacher": "teacher"},
    "ct_resnet18": {"model": "ct_resnet"},
}
TARGETS = ["results/mhd/tables", "results/mhd/figures", "results/mhd/stats.tsv"]


def _tiny_method(path):
    """Three variants for two epochs (the copy only)."""
    settings = yaml.safe_load(path.read_text())
    method = settings["methods"]["mhd"]
    method["variants"] = VARIANTS
    method["train"]["epochs"] = 2
    method["tables"]["table4"]["rows"] = ["ct_resnet18", "teacher", "mhd_net"]
    method["figures"] = {
        "roc": {"rows": ["teacher"], "branches_of": "teacher"},
        "confusion": ["mhd_net", "ct_resnet18"],
        "parameters": ["teacher", "mhd_net"],
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


@pytest.fixture(scope="module")
def mhd_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mhd_workflow")
    copy_workflow(workdir)
    _tiny_method(workdir / "config/methods/mhd.yaml")
    return workdir, run_tiny_dag(workdir, TINY, TARGETS, timeout=900)


@pytest.mark.integration
def test_every_variant_is_trained_and_tested_per_ct_sequence(mhd_run):
    workdir, _ = mhd_run
    results = workdir / "results"
    manifest = pd.read_csv(results / "tet_demo/manifest.tsv", sep="\t")
    assert set(manifest["modality"]) == {"CT", "WSI"} and manifest["patient_id"].nunique() == 16
    slides = manifest[manifest["modality"] == "WSI"]["image_id"]
    assert all((results / "tet_demo/patches" / f"{s}.zarr").is_dir() for s in slides)
    fold_all = pd.read_csv(results / "mhd/fold_all.tsv", sep="\t")
    assert set(fold_all["variant"]) == set(VARIANTS)
    assert set(fold_all["metric"]) == {"mAcc", "mPre", "mRec", "mF1", "QWK"}
    predictions = {
        v: pd.read_csv(results / f"mhd/{v}/fold_0/predictions.tsv", sep="\t") for v in VARIANTS
    }
    # every variant is tested on the same CT sequences
    sequences = [list(p["sequence"]) for p in predictions.values()]
    assert sequences[0] and all(s == sequences[0] for s in sequences)
    assert (results / "mhd/teacher/fold_0/branches.tsv").is_file()
    stats = pd.read_csv(results / "mhd/stats.tsv", sep="\t")
    assert set(stats["test"]) == {"mcnemar"}


@pytest.mark.integration
def test_tables_and_figures_are_written(mhd_run):
    workdir, _ = mhd_run
    table = (workdir / "results/mhd/tables/table4.md").read_text()
    assert "MHD-Net student (CT only)" in table and "Teacher (CT + WSI)" in table
    figures = sorted(p.name for p in (workdir / "results/mhd/figures").glob("*.png"))
    assert figures == [
        "confusion_ct_resnet18.png",
        "confusion_mhd_net.png",
        "parameters.png",
        "roc_teachers.png",
    ]


@pytest.mark.integration
def test_finished_mhd_dag_has_nothing_left_to_do(mhd_run):
    workdir, command = mhd_run
    result = _run([*command, "--dry-run"], workdir)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
