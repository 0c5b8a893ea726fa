"""A subspace-fusion fold end to end in one process, on a small cohort written in the
pipeline's own formats (a manifest with a grade task and survival, feature stores, an
expression table and a GMT file): every task's predictions, test labels that change no
prediction, and a run broken in its second task that resumes to the unbroken run's files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmdiag.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from mmdiag.data.splits import load_fold, make_splits, write_splits
from mmdiag.features.store import write_feature_store
from mmdiag.genes import write_gmt
from mmdiag.io import read_tsv, write_tsv
from mmdiag.methods.ksfusion.fold import FoldInputs, run_ksfusion_fold
from mmdiag.synth.glioma import CLASSES, GRADES
from mmdiag.synth.ksfusion_toy import make_ksfusion_toy

N_PATIENTS = 32
RULES = {
    "classes": list(CLASSES),
    "tasks": {"grade": {"classes": list(GRADES), "ordinal": True, "required": True}},
}


def _method(variant: str = "ours") -> dict:
    tiny = {"heads": 2, "head_dim": 4, "offset_groups": 2, "offset_kernel": 3,
            "gene_hidden": [8], "gene_dim": 8, "embed_dim": 8}  # fmt: skip
    return {
        "outcomes": {"diagnosis": "disease", "grading": "grade", "survival": "survival"},
        "n_time_bins": 2,
        "seed": 0,
        "genes": {
            "sample_key": "slide",
            "subspaces": {"tumour": "tumour", "microenvironment": "microenvironment"},
            "groups": [],
            "top_variable_fraction": None,
            "log1p": False,
            "zscore": True,
        },
        "slides": {"scale": None, "n_patches": 12, "grid_cells": [4, 4]},
        "network": {"ksfusion": tiny},
        "train": {
            "classification": {"epochs": 3, "lr": 5e-3, "device": "cpu"},
            "survival": {"epochs": 3, "lr": 5e-3, "device": "cpu"},
        },
        "variants": {variant: {"model": "ksfusion", "cg_coord": None}},
    }


def _manifest_rows(toy, labels=None) -> pd.DataFrame:
    labels = toy["diagnosis"] if labels is None else labels
    rows = []
    for i in range(N_PATIENTS):
        image_id = f"wsi/P{i:03d}-1"
        rows.append(
            {
                "patient_id": f"P{i:03d}", "modality": "WSI", "image_id": image_id,
                "path": f"/cohort/{image_id}.svs", "sha256": "0" * 64, "width_px": 1024,
                "height_px": 1024, "disease": CLASSES[labels[i]], "mn_stage": "",
                "survival_months": float(toy["time"][i]), "event": int(toy["event"][i]),
                "mpp": "", "grade": GRADES[toy["grade"][i]],
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "grade"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("ksfusion_fold")
    toy = make_ksfusion_toy(N_PATIENTS, grid=(4, 4), feature_dim=8, n_genes=24, seed=3)
    write_manifest(_manifest_rows(toy), root / "manifest.tsv")
    scheme = {"type": "holdout", "fractions": [0.5, 0.25, 0.25], "label": "disease"}
    write_splits(
        make_splits(read_manifest(root / "manifest.tsv"), "h", scheme, seed=1), root / "splits.json"
    )
    for i in range(N_PATIENTS):
        coords = toy["coords"][i]  # (row, column) of the occupied cells
        write_feature_store(
            root / f"stores/wsi/P{i:03d}-1.zarr",
            toy["patches"][i][:, None, :],
            patch_id=np.arange(len(coords)),
            centre_xy=coords[:, ::-1] * 256 + 128,
            attrs={"image_id": f"wsi/P{i:03d}-1", "scales": ["20x"]},
        )
    genes = [f"G{k:02d}" for k in range(toy["genes"].shape[1])]
    table = pd.DataFrame(toy["genes"], columns=genes)
    table.insert(0, "sample_id", [f"P{i:03d}-1" for i in range(N_PATIENTS)])
    write_tsv(table, root / "expression.tsv")
    write_gmt(
        {name: [genes[k] for k in idx] for name, idx in toy["gene_groups"].items()},
        root / "sets.gmt",
    )
    return root, toy


def _inputs(root, manifest="manifest.tsv") -> FoldInputs:
    return FoldInputs(
        root / manifest, root / "splits.json", root / "stores", root / "expression.tsv",
        root / "sets.gmt",
    )  # fmt: skip


def _run(root, out, manifest="manifest.tsv"):
    return run_ksfusion_fold(
        inputs=_inputs(root, manifest), fold=0, variant="ours", method_settings=_method(),
        manifest_rules=RULES, out_dir=out,
    )  # fmt: skip


@pytest.fixture(scope="module")
def whole(cohort, tmp_path_factory):
    root, _ = cohort
    out = tmp_path_factory.mktemp("whole") / "fold_0"
    _run(root, out)
    return out


def test_every_task_predicts_every_test_sample_once(cohort, whole):
    root, _ = cohort
    predictions = read_tsv(whole / "predictions.tsv")
    test = set(load_fold(root / "splits.json", 0)["test"])
    for task in ("diagnosis", "grading", "survival"):
        rows = predictions[predictions["task"] == task]
        assert sorted(rows["patient_id"]) == sorted(test)
        prob = rows.filter(like="prob_").dropna(axis=1)
        assert np.allclose(prob.sum(axis=1), 1.0)
    survival = predictions[predictions["task"] == "survival"]
    assert survival["risk"].notna().all() and list(prob.columns) == ["prob_bin_0", "prob_bin_1"]
    metrics = read_tsv(whole / "metrics.tsv")
    assert {"diagnosis/AUC", "grading/SPE", "survival/C-index"} <= set(metrics["metric"])


def test_test_labels_change_no_prediction(cohort, whole, tmp_path):
    root, toy = cohort
    test = set(load_fold(root / "splits.json", 0)["test"])
    labels = toy["diagnosis"].copy()
    for i in range(N_PATIENTS):
        if f"P{i:03d}" in test:
            labels[i] = (labels[i] + 1) % len(CLASSES)  # another class for every test patient
    write_manifest(_manifest_rows(toy, labels), root / "permuted.tsv")
    out = tmp_path / "fold_0"
    _run(root, out, "permuted.tsv")
    before, after = read_tsv(whole / "predictions.tsv"), read_tsv(out / "predictions.tsv")
    prob = [c for c in before.columns if c.startswith("prob_")]
    pd.testing.assert_frame_equal(after[prob], before[prob])
    diagnosis = before["task"] == "diagnosis"
    assert (after.loc[diagnosis, "y_true"] != before.loc[diagnosis, "y_true"]).all()


def test_a_run_broken_in_its_second_task_resumes_to_the_same_files(cohort, whole, tmp_path):
    import mmdiag.training.loop as loop

    root, _ = cohort
    original = loop._epoch_row

    def broken(run, epoch, *args):
        if "grading" in run_description.get("current", "") and epoch == 2:
            raise KeyboardInterrupt("killed")
        return original(run, epoch, *args)

    run_description = {}
    original_train = loop.train_model

    def tracking(*args, description="", **kwargs):
        run_description["current"] = description
        return original_train(*args, description=description, **kwargs)

    out = tmp_path / "fold_0"
    import mmdiag.methods.ksfusion.fold as fold

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_epoch_row", broken)
        patch.setattr(fold, "train_model", tracking)
        with pytest.raises(KeyboardInterrupt):
            _run(root, out)
    assert not out.exists() and (tmp_path / ".fold_0.resume" / "grading").is_dir()
    _run(root, out)
    for name in ("predictions.tsv", "metrics.tsv", "genes.tsv"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    logs = [read_tsv(d / "train_log.tsv").drop(columns="seconds") for d in (out, whole)]
    pd.testing.assert_frame_equal(*logs)
    assert not (tmp_path / ".fold_0.resume").exists()
