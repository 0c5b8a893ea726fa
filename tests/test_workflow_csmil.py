"""A real Snakemake run of the CS-MIL chain on tiny toy cohorts: synthetic slides -> patches ->
SimSiam encoders per scale -> features -> phenotype clusters -> MIL per split -> tables,
figures and Table 5."""

import pandas as pd
import pytest
import yaml

from mmdiag.features.store import open_feature_store
from tests.test_workflow import _run, copy_workflow, run_tiny_dag

TOY = {"n_slides": 10, "n_sites": 4}
TINY_CONFIG = {
    "cohorts": {
        "toy_micro": {"toy": TOY},
        "toy_macro": {"toy": TOY},
        "toy_mixed": {"toy": TOY},
    },
    "patching": {"patch_px": 128, "workers": 1, "thumbnail_mpp": 2.0},
    "ssl": {"image_px": 32, "dim": 32, "predictor_dim": 8, "epochs": 1, "batch_size": 8},
    "features": {"batch_size": 32},
    "splits": {"schemes": {"csmil_repeated": {"n_repeats": 2}}},
}
VARIANTS = {
    "deepattnmisl_20x": {"model": "deepattnmisl", "options": {"scale_index": 0}},
    "mean_vector": {"model": "csmil", "options": {"fusion": "mean"}},
    "csmil": {"model": "csmil"},
}
TABLE = {
    "rows": list(VARIANTS),
    "metrics": ["AUC", "AP"],
    "scale": 1,
    "digits": 4,
    "labels": {"csmil": "CS-MIL (ours)"},
}


def _tiny_methods(path):
    """Keep the two toy methods with three variants and a few epochs (the copy only)."""
    settings = yaml.safe_load(path.read_text())
    methods = {}
    for name in ("csmil_micro", "csmil_macro"):
        method = settings["methods"][name]
        method |= {"variants": VARIANTS, "tables": {"table5": TABLE}}
        method["train"] |= {"epochs": 5}
        method["bags"] |= {"size": 4, "test_bags": 10, "val_bags": 2}
        methods[name] = method
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    settings["methods"] = methods
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


@pytest.fixture(scope="module")
def csmil_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("csmil_workflow")
    copy_workflow(workdir)
    _tiny_methods(workdir / "config/methods/csmil.yaml")
    targets = [
        "results/csmil_micro/tables",
        "results/csmil_micro/figures",
        "results/csmil_toy/table5.md",
    ]
    return workdir, run_tiny_dag(workdir, TINY_CONFIG, targets, timeout=900)


@pytest.mark.integration
def test_every_scale_gets_an_encoder_and_every_slide_its_features(csmil_run):
    workdir, _ = csmil_run
    cohort = workdir / "results/toy_micro"
    for scale in ("20x", "10x", "5x"):
        log = pd.read_csv(cohort / f"ssl/{scale}/train_log.tsv", sep="\t")
        assert list(log["epoch"]) == [1] and log["embedding_std"].iloc[0] > 0
        assert (cohort / f"ssl/{scale}/encoder.safetensors").is_file()
    assert not (cohort / "ssl/.resume").exists() or not any((cohort / "ssl/.resume").iterdir())
    stores = sorted((cohort / "features/stores").rglob("*.zarr"))
    assert len(stores) == TOY["n_slides"]
    store = open_feature_store(stores[0])
    assert store.features.shape[:2] == (TOY["n_sites"], 3) and store.scales == ["20x", "10x", "5x"]
    clusters = pd.read_csv(cohort / "features/clusters.tsv", sep="\t")
    assert len(clusters) == TOY["n_slides"] * TOY["n_sites"]
    assert (clusters.groupby("patient_id")["cluster"].nunique() <= 8).all()
    assert {"cluster_20x", "cluster_10x", "cluster_5x"} <= set(clusters.columns)


@pytest.mark.integration
def test_tables_figures_and_the_toy_benchmark_table(csmil_run):
    workdir, _ = csmil_run
    results = workdir / "results"
    fold_all = pd.read_csv(results / "csmil_micro/fold_all.tsv", sep="\t")
    assert set(fold_all["variant"]) == set(VARIANTS) and set(fold_all["fold"]) == {0, 1}
    assert {"AUC", "AP"} <= set(fold_all["metric"])
    table = (results / "csmil_micro/tables/table5.md").read_text()
    assert "| CS-MIL (ours) |" in table and "p-value (delong)" in table
    figures = {p.name for p in (results / "csmil_micro/figures").glob("*.png")}
    assert {"roc_pr.png", "scale_attention_boxplot.png"} <= figures
    scale_maps = [n for n in figures if n.startswith("attention_") and n.endswith("_5x.png")]
    assert scale_maps and all(n.replace("_5x.png", "_instance.png") in figures for n in scale_maps)
    toy = pd.read_csv(results / "csmil_toy/table5.tsv", sep="\t").set_index("Method")
    assert list(toy.columns) == [
        "Micro-anomaly AUC",
        "Micro-anomaly AP",
        "Macro-anomaly AUC",
        "Macro-anomaly AP",
        "Mean",
    ]
    assert toy.loc["CS-MIL (ours)", "Mean"] == pytest.approx(
        toy.loc["CS-MIL (ours)"].iloc[:4].mean()
    )


@pytest.mark.integration
def test_finished_csmil_dag_has_nothing_left_to_do(csmil_run):
    workdir, command = csmil_run
    result = _run([*command, "--dry-run"], workdir)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr
