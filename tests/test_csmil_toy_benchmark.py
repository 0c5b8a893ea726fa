"""CS-MIL's toy benchmark at tiny size, end to end in one process: toy slides -> concentric
patches -> an encoder per scale -> features -> phenotype clusters -> MIL on held-out slides.

The paper's qualitative result must hold: CS-MIL beats chance on both datasets, while the
20x-only model stays near chance on the macro-anomaly (seen only in the wide fields) and the
5x-only model on the micro-anomaly (crosses that vanish once the 5x field is reduced).
"""

import json

import numpy as np
import pandas as pd
import pytest

from mmdiag.config import load_config
from mmdiag.data.manifest import ManifestRules, build_manifest, write_manifest
from mmdiag.features.extract import ExtractSettings, extract_cohort_features
from mmdiag.features.phenotypes import cluster_patients
from mmdiag.methods.csmil.fold import run_csmil_fold
from mmdiag.patching.pipeline import patch_slide
from mmdiag.ssl.train import SSLSettings, pretrain
from mmdiag.synth.toy_mil import write_toy_cohort

N_SLIDES, PATCH_PX = 40, 128
CLASSES = ["negative", "positive"]


def _patching_settings() -> dict:
    config = load_config(["config/config.yaml"])
    return config["patching"] | {"patch_px": PATCH_PX, "thumbnail_mpp": 2.0, "workers": 1}


def _encoders(stores, folder) -> dict:
    """One SimSiam encoder per scale, two epochs on the cohort's patches (as the demo)."""
    settings = SSLSettings(
        backbone="test_resnet",
        image_px=PATCH_PX,
        dim=64,
        predictor_dim=16,
        epochs=2,
        batch_size=32,
        workers=0,
        device="cpu",
        channels_last=False,
    )
    weights = {}
    for scale in ("20x", "10x", "5x"):
        pretrain(
            stores,
            scale,
            settings,
            out_dir=folder / scale,
            state_dir=folder / f"{scale}.state",
            progress=False,
        )
        weights[scale] = folder / scale / "encoder.safetensors"
    return weights


def _splits(manifest: pd.DataFrame, path) -> None:
    """Three splits, 24 train / 4 val / 12 test slides, balanced."""
    labels = manifest.drop_duplicates("patient_id").set_index("patient_id")["disease"]
    folds = []
    for fold in range(3):
        rng = np.random.default_rng(fold)
        parts = {"train": [], "val": [], "test": []}
        for label in CLASSES:
            patients = rng.permutation(labels[labels == label].index.to_numpy())
            parts["train"] += list(patients[:12])
            parts["val"] += list(patients[12:14])
            parts["test"] += list(patients[14:])
        folds.append({"fold": fold, **{k: sorted(v) for k, v in parts.items()}})
    splits = {
        "scheme": "toy",
        "type": "repeated",
        "seed": 0,
        "label": "disease",
        "n_patients": len(labels),
        "params": {},
        "folds": folds,
    }
    path.write_text(json.dumps(splits))


@pytest.fixture(scope="module", params=["micro", "macro"])
def toy(request, tmp_path_factory):
    """Features, clusters and splits of a 40-slide toy dataset."""
    root = tmp_path_factory.mktemp(f"toy_{request.param}")
    raw = write_toy_cohort(
        root / "raw",
        kind=request.param,
        n_slides=N_SLIDES,
        seed=5,
        patch_px=PATCH_PX,
        progress=False,
    )
    rules = ManifestRules(
        classes=tuple(CLASSES), stages=(), required_modalities=("WSI",), min_image_px={"WSI": 64}
    )
    manifest = build_manifest(cohort_root=raw, manifest_tsv=None, rules=rules, progress=False)
    write_manifest(manifest, root / "manifest.tsv")
    settings, stores = _patching_settings(), []
    for row in manifest.itertuples():
        store = root / "patches" / f"{row.image_id}.zarr"
        masks = root / "masks" / row.image_id
        patch_slide(
            row.path,
            settings,
            store_path=store,
            mask_path=masks.with_suffix(".png"),
            qc_path=masks.with_name(masks.name + "_qc.png"),
            progress=False,
        )
        stores.append(store)
    extract = ExtractSettings(backbone="test_resnet", batch_size=64, workers=0, device="cpu")
    encoders = _encoders(stores, root / "ssl")
    extract_cohort_features(
        stores,
        list(manifest["image_id"]),
        encoders,
        extract,
        out_dir=root / "features",
        progress=False,
    )
    features = sorted((root / "features").rglob("*.zarr"))
    patients = dict(zip(manifest["image_id"], manifest["patient_id"], strict=True))
    cluster_patients(features, patients).to_csv(root / "clusters.tsv", sep="\t", index=False)
    _splits(manifest, root / "splits.json")
    return request.param, root, features


# z of the two-sided bound on a blind model's AUC: chance +- Z_NULL null standard errors
Z_NULL = 2.0


def null_auc_variance(n_pos: int, n_neg: int) -> float:
    """Variance of the AUC (Mann-Whitney U / n_pos n_neg) of uninformative scores."""
    return (n_pos + n_neg + 1) / (12 * n_pos * n_neg)


def _mean_auc(toy, variant: str) -> tuple[float, float]:
    """The mean test AUC of ``variant`` over the three splits, and its standard error under
    the null (folds taken as independent, each with its own numbers of test slides)."""
    kind, root, features = toy
    config = load_config(
        ["config/config.yaml", "config/methods/cmus.yaml", "config/methods/csmil.yaml"]
    )
    settings = config["methods"]["csmil_micro"]
    settings["train"] |= {"epochs": 40}
    settings["bags"] |= {"test_bags": 5, "val_bags": 2}
    aucs, variances = [], []
    for fold in range(3):
        out_dir = root / "runs" / variant / str(fold)
        metrics = run_csmil_fold(
            manifest_path=root / "manifest.tsv",
            splits_path=root / "splits.json",
            feature_paths=features,
            clusters_path=root / "clusters.tsv",
            fold=fold,
            variant=variant,
            method="csmil_micro",
            method_settings=settings,
            classes=CLASSES,
            out_dir=out_dir,
        )
        y_true = pd.read_csv(out_dir / "predictions.tsv", sep="\t")["y_true"]
        n_pos, n_neg = int((y_true == 1).sum()), int((y_true == 0).sum())
        assert n_pos + n_neg == len(y_true) and n_pos > 0 and n_neg > 0
        aucs.append(metrics["AUC"])
        variances.append(null_auc_variance(n_pos, n_neg))
    return float(np.mean(aucs)), float(np.sqrt(np.sum(variances)) / len(aucs))


def test_null_auc_variance_is_the_mann_whitney_null():
    # all 20 orderings of 3 positives and 3 negatives are equally likely under the null
    from itertools import combinations

    aucs = [
        sum(p > n for p in positives for n in set(range(6)) - set(positives)) / 9
        for positives in combinations(range(6), 3)
    ]
    assert np.mean(aucs) == pytest.approx(0.5)
    assert np.var(aucs) == pytest.approx(null_auc_variance(3, 3))


def test_csmil_beats_chance_on_both_toy_datasets(toy):
    assert _mean_auc(toy, "csmil")[0] >= 0.8, toy[0]


def test_a_single_scale_model_is_blind_to_the_anomaly_it_cannot_see(toy):
    kind = toy[0]
    blind = {"micro": "deepattnmisl_5x", "macro": "deepattnmisl_20x"}[kind]
    auc, null_se = _mean_auc(toy, blind)
    # neither better nor worse than chance beyond Z_NULL standard errors of the null AUC
    assert abs(auc - 0.5) <= Z_NULL * null_se, (kind, auc, null_se)
