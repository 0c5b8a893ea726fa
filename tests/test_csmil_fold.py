"""The CS-MIL split runner on feature stores with a planted signal, its metrics and Table 5."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmdiag.config import ConfigError, load_config, validate_config
from mmdiag.data.manifest import MANIFEST_COLUMNS, write_manifest
from mmdiag.features.phenotypes import cluster_patients
from mmdiag.features.store import write_feature_store
from mmdiag.methods.csmil.fold import run_csmil_fold
from mmdiag.methods.csmil.toy_table import render_toy_html, render_toy_markdown, toy_table
from mmdiag.models import create_model

CLASSES = ["negative", "positive"]
N_PATIENTS, N_PATCHES, DIM = 30, 12, 16


def _features(rng, positive: bool) -> np.ndarray:
    """Noise at every scale; a positive slide has three patches whose 5x features 0-3 are high."""
    features = rng.normal(0, 1, (N_PATCHES, 3, DIM)).astype(np.float32)
    if positive:
        features[rng.choice(N_PATCHES, 3, replace=False), 2, :4] += 3.0
    return features


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Manifest, feature stores, clusters and a 3-split 6:1:3 scheme of 30 slides."""
    root = tmp_path_factory.mktemp("csmil")
    rng = np.random.default_rng(0)
    rows, stores = [], []
    for i in range(N_PATIENTS):
        patient, positive = f"T{i:03d}", i % 2 == 1
        image_id = f"wsi/{patient}"
        path = write_feature_store(
            root / "features" / f"{image_id}.zarr",
            _features(rng, positive),
            patch_id=np.arange(N_PATCHES),
            centre_xy=np.zeros((N_PATCHES, 2), dtype=np.int64),
            attrs={"image_id": image_id, "scales": ["20x", "10x", "5x"]},
        )
        stores.append(path)
        rows.append(
            {
                "patient_id": patient,
                "modality": "WSI",
                "image_id": image_id,
                "path": str(path),
                "sha256": "0" * 64,
                "width_px": 1,
                "height_px": 1,
                "disease": CLASSES[positive],
                "mn_stage": "",
                "survival_months": 1.0,
                "event": 0,
                "mpp": 0.5,
            }
        )
    manifest = write_manifest(pd.DataFrame(rows)[list(MANIFEST_COLUMNS)], root / "manifest.tsv")
    patients = {r["image_id"]: r["patient_id"] for r in rows}
    clusters = cluster_patients(stores, patients, n_clusters=4, seed=0)
    clusters.to_csv(root / "clusters.tsv", sep="\t", index=False)
    folds = []
    for k in range(3):
        order = np.random.default_rng(k).permutation([r["patient_id"] for r in rows])
        folds.append(
            {
                "fold": k,
                "train": sorted(order[:18]),
                "val": sorted(order[18:21]),
                "test": sorted(order[21:]),
            }
        )
    splits = {
        "scheme": "rep",
        "type": "repeated",
        "seed": 0,
        "label": "disease",
        "n_patients": N_PATIENTS,
        "params": {},
        "folds": folds,
    }
    (root / "splits.json").write_text(json.dumps(splits))
    return {
        "root": root,
        "manifest": manifest,
        "stores": stores,
        "clusters": root / "clusters.tsv",
        "splits": root / "splits.json",
    }


def _method(variants: dict) -> dict:
    config = load_config(
        ["config/config.yaml", "config/methods/cmus.yaml", "config/methods/csmil.yaml"]
    )
    settings = config["methods"]["csmil"]
    settings["variants"] = {
        name: settings["variants"][name] | {"options": settings["variants"][name]["options"]}
        for name in variants
    }
    settings["train"] |= {"epochs": 12, "batch_size": 2, "lr": 3e-3}
    settings["bags"] |= {"size": N_PATCHES, "test_bags": 20, "val_bags": 4}
    return settings


def _run(cohort, variant, settings, tmp_path, fold=0):
    return run_csmil_fold(
        manifest_path=cohort["manifest"],
        splits_path=cohort["splits"],
        feature_paths=cohort["stores"],
        clusters_path=cohort["clusters"],
        fold=fold,
        variant=variant,
        method="csmil",
        method_settings=settings,
        classes=CLASSES,
        out_dir=tmp_path / variant / f"fold_{fold}",
    )


def test_csmil_learns_the_5x_signal_and_writes_its_fold(cohort, tmp_path):
    settings = _method({"csmil": None})
    metrics = _run(cohort, "csmil", settings, tmp_path)
    out = tmp_path / "csmil" / "fold_0"
    predictions = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"patient_id": str})
    assert len(predictions) == 9
    assert list(predictions.columns[:7]) == [
        "patient_id",
        "fold",
        "variant",
        "y_true",
        "y_pred",
        "prob_negative",
        "prob_positive",
    ]
    np.testing.assert_allclose(predictions[["prob_negative", "prob_positive"]].sum(axis=1), 1.0)
    assert (predictions["score_max"] >= predictions["score_median"] - 1e-12).all()
    assert metrics["AUC"] >= 0.85, metrics
    # The metrics file holds what the runner returned, AP included.
    table = pd.read_csv(out / "metrics.tsv", sep="\t").set_index("metric")["value"]
    assert table["AUC"] == pytest.approx(metrics["AUC"]) and "AP" in table.index
    # The kept weights are the epoch with the lowest validation loss.
    log = pd.read_csv(out / "train_log.tsv", sep="\t")
    last_selected = log.loc[log["selected"].fillna(False).astype(bool), "val_loss"].iloc[-1]
    assert last_selected == pytest.approx(log["val_loss"].min())
    fresh = create_model("csmil", in_dim=DIM)
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))  # strict: same model
    # Attention: one row per test patch, instance attention in [0, 1], scale attention on
    # the simplex (softmax over the 3 scales, eq. 3).
    attention = pd.read_csv(out / "attention.tsv", sep="\t")
    assert len(attention) == 9 * N_PATCHES
    seen = attention.dropna()
    assert ((seen["instance_attention"] >= 0) & (seen["instance_attention"] <= 1)).all()
    scale_columns = [f"scale_attention_{s}" for s in range(3)]
    np.testing.assert_allclose(seen[scale_columns].sum(axis=1), 1.0, rtol=1e-5)


def test_the_20x_baseline_cannot_see_a_5x_signal(cohort, tmp_path):
    settings = _method({"deepattnmisl_20x": None})
    aucs = [_run(cohort, "deepattnmisl_20x", settings, tmp_path, fold)["AUC"] for fold in range(3)]
    assert np.mean(aucs) < 0.75, aucs


def test_a_run_is_reproducible(cohort, tmp_path):
    settings = _method({"naive": None})
    first = _run(cohort, "naive", settings, tmp_path / "a")
    second = _run(cohort, "naive", settings, tmp_path / "b")
    assert first == second
    a = load_file(str(tmp_path / "a" / "naive" / "fold_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "naive" / "fold_0" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_test_patient_is_an_error_naming_the_split(cohort, tmp_path):
    splits = json.loads(cohort["splits"].read_text())
    splits["folds"][0]["test"].append("T999")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="bad.json"):
        run_csmil_fold(
            manifest_path=cohort["manifest"],
            splits_path=bad,
            feature_paths=cohort["stores"],
            clusters_path=cohort["clusters"],
            fold=0,
            variant="csmil",
            method="csmil",
            method_settings=_method({"csmil": None}),
            classes=CLASSES,
            out_dir=tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()


def test_a_slide_at_exactly_one_half_is_called_positive_and_scored_so():
    from types import SimpleNamespace

    from mmdiag.methods.csmil.fold import METRICS, slide_predictions
    from mmdiag.training.fold_outputs import fold_metrics

    test = [
        SimpleNamespace(patient_id=p, case_id=p, label=y)
        for p, y in zip("abcd", [0, 0, 1, 1], strict=True)
    ]
    means = [0.1, 0.5, 0.35, 0.8]
    scores = [SimpleNamespace(mean=m, median=m, max=m) for m in means]
    predictions = slide_predictions(test, scores, 0, "v", CLASSES)
    assert predictions["y_pred"].tolist() == [0, 1, 0, 1]
    metrics = fold_metrics(predictions, CLASSES, METRICS)
    # from y_pred: b (0.5) is a false positive, c a false negative; the arg-max of (0.5, 0.5)
    # would have called b negative and given ACC 0.75
    assert metrics["ACC"] == pytest.approx(0.5)
    assert metrics["AUC"] == pytest.approx(0.75)  # d > a, d > b, c > a; c < b
    assert metrics["AP"] == pytest.approx((1 + 2 / 3) / 2)  # precision at each positive


def test_toy_table_means_and_best_row():
    def fold_all(values):
        return pd.DataFrame(
            [
                {"method": "m", "variant": v, "fold": f, "metric": m, "value": x}
                for (v, m), xs in values.items()
                for f, x in enumerate(xs)
            ]
        )

    micro = fold_all(
        {
            ("a", "AUC"): [1.0, 0.8],
            ("a", "AP"): [1.0, 1.0],
            ("b", "AUC"): [0.5, 0.5],
            ("b", "AP"): [0.6, 0.4],
        }
    )
    macro = fold_all(
        {
            ("a", "AUC"): [0.6, 0.6],
            ("a", "AP"): [0.7, 0.7],
            ("b", "AUC"): [1.0, 1.0],
            ("b", "AP"): [1.0, 1.0],
        }
    )
    table = toy_table({"Micro": micro, "Macro": macro}, ["a", "b"], {"a": "A"})
    assert table.loc["A", "Micro AUC"] == pytest.approx(0.9)
    assert table.loc["A", "Mean"] == pytest.approx((0.9 + 1.0 + 0.6 + 0.7) / 4)
    assert table.loc["b", "Mean"] == pytest.approx((0.5 + 0.5 + 1.0 + 1.0) / 4)
    text = render_toy_markdown(table, reference_label="A")
    assert "| A (Ref.) |" in text and "**0.8000**" in text
    page = render_toy_html(table, reference_label="A")
    assert "<td>A (Ref.)</td><td>0.9000</td><td>1.0000</td><td>0.6000</td>" in page
    assert "<td><b>0.8000</b></td></tr>" in page and "<td>0.7500</td></tr>" in page


def test_csmil_config_validates_and_rejects_unknown_models():
    config = load_config(
        ["config/config.yaml", "config/methods/cmus.yaml", "config/methods/csmil.yaml"]
    )
    variant = config["methods"]["csmil"]["variants"]["naive"]
    assert variant == {"model": "csmil", "clustering": False, "cluster_scale": None, "options": {}}
    assert config["methods"]["csmil"]["variants"]["deepattnmisl_5x"]["cluster_scale"] == "5x"
    config["methods"]["csmil"]["variants"]["bad"] = {"model": "transmil"}
    with pytest.raises(ConfigError, match="transmil"):
        validate_config(config)


def test_standardising_uses_training_statistics_only(cohort):
    from mmdiag.methods.csmil.data import Slide, standardise

    def slide(value):
        features = np.full((2, 3, 4), value, dtype=np.float32)
        features[1] += 1.0
        return Slide("p", 0, "a", features, np.zeros(2, int), np.array(["a", "a"]), np.arange(2))

    parts = {"train": [slide(0.0), slide(2.0)], "val": [], "test": [slide(100.0)]}
    scaled, mean, std = standardise(parts)
    np.testing.assert_allclose(mean, 1.5)  # patches 0, 1, 2, 3 of the two training slides
    np.testing.assert_allclose(std, np.sqrt(1.25) + 1e-6, rtol=1e-6)
    train = np.concatenate([s.features for s in scaled["train"]])
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        scaled["test"][0].features[0], (100.0 - 1.5) / (np.sqrt(1.25) + 1e-6), rtol=1e-5
    )


def test_by_hand_commands_use_the_cohorts_own_manifest_rules(tmp_path):
    from typer.testing import CliRunner

    from mmdiag.cli import app
    from mmdiag.config import cohort_manifest_rules as _cohort_manifest_rules

    config = load_config(
        ["config/config.yaml", "config/methods/cmus.yaml", "config/methods/csmil.yaml"]
    )
    assert _cohort_manifest_rules(config, "toy_micro")["classes"] == CLASSES
    assert _cohort_manifest_rules(config, "toy_micro")["required_modalities"] == ["WSI"]
    assert _cohort_manifest_rules(config, "demo")["classes"] == ["IgAN", "MN", "LN"]
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--cohort", "nope"])
    assert result.exit_code == 1 and "unknown cohort 'nope'" in result.output
    assert not (tmp_path / "x").exists()


def test_the_unit_is_a_slide_or_a_patient_with_its_slides_pooled(cohort, tmp_path):
    from mmdiag.data.manifest import read_manifest
    from mmdiag.methods.csmil.data import load_slides

    manifest = read_manifest(cohort["manifest"])
    # slides i and i + 2 of one patient: same label (the labels alternate)
    number = manifest["patient_id"].str[1:].astype(int)
    paired = manifest.assign(patient_id=[f"P{n // 4}{n % 2}" for n in number])
    paired_path = write_manifest(paired, tmp_path / "paired.tsv")
    args = (cohort["stores"], cohort["clusters"], "positive")
    slides = load_slides(paired_path, *args, unit="slide")
    patients = load_slides(paired_path, *args, unit="patient")
    assert len(slides) == N_PATIENTS and len(patients) == N_PATIENTS // 2 + 1  # 30 slides, 16
    pooled = patients["P00"]
    assert sorted(set(pooled.image_ids)) == ["wsi/T000", "wsi/T002"]
    np.testing.assert_array_equal(
        pooled.features,
        np.concatenate([slides["wsi/T000"].features, slides["wsi/T002"].features]),
    )
    assert slides["wsi/T002"].patient_id == "P00" and slides["wsi/T002"].case_id == "wsi/T002"
    mixed = manifest.assign(patient_id=[f"P{n // 2}" for n in number])  # a negative + a positive
    mixed_path = write_manifest(mixed, tmp_path / "mixed.tsv")
    assert len(load_slides(mixed_path, *args, unit="slide")) == N_PATIENTS
    with pytest.raises(ValueError, match="patient P0: its slides have different labels"):
        load_slides(mixed_path, *args, unit="patient")
    with pytest.raises(ValueError, match="unit must be one of"):
        load_slides(mixed_path, *args, unit="region")


def test_csmil_on_a_cohort_without_two_classes_fails_at_config_validation(tmp_path):
    import yaml

    from mmdiag.config import ConfigError

    override = {"cohorts": {"toy_mixed": {"manifest_rules": {"classes": ["a", "b", "c"]}}}}
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(override))
    files = ["config/config.yaml", "config/methods/csmil.yaml", tmp_path / "three.yaml"]
    with pytest.raises(
        ConfigError,
        match=r"methods.csmil: CS-MIL needs two classes with "
        r"'positive' among them; the manifest allows \['a', 'b', 'c'\]",
    ):
        load_config(files)
