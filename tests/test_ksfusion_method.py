"""Subspace fusion's data layer and trainer pieces: feature grids from patch positions, fixed
patch sets, sample-to-profile matching, the gene space fitted on training samples only,
survival bins and bin probabilities, the settings' recipes and checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmdiag.genes import write_gmt
from mmdiag.methods.ksfusion import data
from mmdiag.methods.ksfusion.fold import event_bin_probabilities
from mmdiag.methods.ksfusion.settings import recipe, train_settings_of, uses_cg_coord
from mmdiag.training.survival import survival_from_hazards

# ------------------------------------------------------------------------------------ grid


def test_patches_land_on_the_cells_of_their_positions():
    step = 256
    cells = np.array([[0, 0], [2, 0], [1, 1], [2, 2]])  # column, row
    centre_xy = 1000 + step // 2 + cells * step
    features = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    grid, mask = data.patch_grid(features, centre_xy, (3, 3))
    assert grid.shape == (3, 3, 3) and mask.shape == (1, 3, 3)
    for (col, row), feature in zip(cells, features, strict=True):
        assert np.array_equal(grid[:, row, col], feature)
    assert mask.sum() == 4 and mask[0, 0, 1] == 0 and not grid[:, 0, 1].any()


def test_a_small_tissue_is_centred_and_a_large_one_pooled():
    centre_xy = np.array([[0, 0], [10, 0]])
    grid, mask = data.patch_grid(np.ones((2, 1), np.float32), centre_xy, (4, 4))
    # two neighbours in a 4 x 4 map: the 1 x 2 tissue sits in row 1, columns 1-2
    assert np.argwhere(mask[0]).tolist() == [[1, 1], [1, 2]]
    row = np.arange(8)
    centre_xy = np.stack([row * 5, np.zeros(8, int)], axis=1)  # 8 patches in one row
    features = row[:, None].astype(np.float32)
    grid, mask = data.patch_grid(features, centre_xy, (2, 4))
    # pooled by 2: each cell is the mean of two neighbours
    assert grid[0, 0].tolist() == [0.5, 2.5, 4.5, 6.5] and mask[0, 0].all()
    assert not mask[0, 1].any()


def test_the_grid_follows_positions_not_row_order():
    rng = np.random.default_rng(0)
    cells = np.array([[c, r] for r in range(3) for c in range(3)])
    features = rng.normal(size=(9, 2)).astype(np.float32)
    order = rng.permutation(9)
    a = data.patch_grid(features, cells * 7, (3, 3))[0]
    b = data.patch_grid(features[order], cells[order] * 7, (3, 3))[0]
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------- patch set


def test_a_large_slide_gives_a_subset_a_small_one_its_repeats():
    features = np.arange(10, dtype=np.float32)[:, None]
    subset = data.fixed_patch_set(features, 4, np.random.default_rng(0))
    assert len(subset) == 4 and len(set(subset[:, 0])) == 4
    repeated = data.fixed_patch_set(features[:3], 8, np.random.default_rng(0))
    counts = np.bincount(repeated[:, 0].astype(int), minlength=3)
    # every patch twice, two of them a third time
    assert counts.sum() == 8 and sorted(counts) == [2, 3, 3]


# --------------------------------------------------------------------------------- genes


def _samples():
    manifest = pd.DataFrame(
        {
            "patient_id": ["P1", "P1", "P2", "P3"],
            "modality": ["WSI", "WSI", "WSI", "CT"],
            "image_id": ["wsi/P1-1", "wsi/P1-2", "wsi/P2-1", "ct/P3"],
        }
    )
    return data.slide_samples(manifest, "manifest.tsv")


def test_samples_are_the_slides_named_by_their_file_stem():
    samples = _samples()
    assert samples["sample_id"].tolist() == ["P1-1", "P1-2", "P2-1"]
    assert samples["patient_id"].tolist() == ["P1", "P1", "P2"]


def test_profiles_match_slides_or_patients_and_a_missing_one_is_named(tmp_path):
    samples = _samples()
    table = pd.DataFrame({"sample_id": ["P1-1", "P1-2"], "G1": [1.0, 2.0]})
    path = tmp_path / "expression.tsv"
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"expression.tsv: no expression profile .*P2-1"):
        data.sample_expression(path, samples, "slide")
    by_patient = pd.DataFrame({"sample_id": ["P1", "P2"], "G1": [5.0, 7.0]})
    by_patient.to_csv(path, sep="\t", index=False)
    rows = data.sample_expression(path, samples, "patient")
    assert rows.index.tolist() == ["P1-1", "P1-2", "P2-1"]
    assert rows["G1"].tolist() == [5.0, 5.0, 7.0]


def _gene_settings(**overrides):
    base = {
        "top_variable_fraction": None,
        "log1p": False,
        "zscore": True,
        "subspaces": {"tumour": "T", "microenvironment": "E"},
        "groups": [],
    }
    return base | overrides


def test_the_gene_space_is_fitted_on_the_training_samples_only(tmp_path):
    gmt = tmp_path / "sets.gmt"
    write_gmt({"T": ["g1", "g2"], "E": ["g3", "g4"], "P": ["g2", "g3"]}, gmt)
    rng = np.random.default_rng(1)
    genes = ["g0", "g1", "g2", "g3", "g4"]
    train = pd.DataFrame(rng.normal(size=(6, 5)), columns=genes)
    space = data.fit_gene_space(train, gmt, _gene_settings(groups=["P"]))
    # g0 belongs to no subspace; the others keep table order
    assert space.genes == ["g1", "g2", "g3", "g4"]
    assert space.subspaces == {"tumour": [0, 1], "microenvironment": [2, 3]}
    assert space.groups == {"P": [1, 2]}
    z = space.transform(train)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-6) and np.allclose(z.std(axis=0), 1, atol=1e-5)
    # a shifted test sample does not move the training statistics
    test = train.iloc[:1] + 100.0
    assert np.allclose(
        space.transform(test),
        space.transform(train.iloc[:1])
        + 100.0 / train[["g1", "g2", "g3", "g4"]].std(ddof=0).to_numpy(),
        atol=1e-4,
    )


def test_highly_variable_genes_are_chosen_on_the_training_samples(tmp_path):
    gmt = tmp_path / "sets.gmt"
    write_gmt({"T": ["g1", "g2"], "E": ["g3", "g4"]}, gmt)
    rng = np.random.default_rng(2)
    train = pd.DataFrame(
        rng.normal(size=(20, 5)) * np.array([1, 5, 0.1, 4, 0.2]),
        columns=[f"g{i}" for i in range(5)],
    )
    space = data.fit_gene_space(train, gmt, _gene_settings(top_variable_fraction=0.4))
    assert space.genes == ["g1", "g3"]  # the two most variable of five
    with pytest.raises(ValueError, match="subspace 'tumour' keeps no gene"):
        flat = train.assign(g1=0.0)
        data.fit_gene_space(flat, gmt, _gene_settings(top_variable_fraction=0.2))


# ------------------------------------------------------------------------------- survival


def test_survival_bins_count_each_training_patient_once():
    outcomes = pd.DataFrame(
        {"survival_months": [1.0, 2.0, 3.0, 4.0, 5.0, 50.0], "event": [1, 1, 1, 1, 1, 1]},
        index=[f"P{i}" for i in range(6)],
    )
    edges = data.survival_bins(outcomes, ["P0", "P1", "P2", "P3", "P4"], 4)
    assert edges.tolist() == [0.0, 2.0, 3.0, 4.0, np.inf]  # P5 (a test patient) plays no part


def test_bin_probabilities_are_the_event_mass_of_each_bin():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [3.0, -2.0, 0.5, 0.0]])
    prob = event_bin_probabilities(logits)
    assert torch.allclose(prob.sum(dim=1), torch.ones(2))
    survival = survival_from_hazards(logits)
    h = torch.sigmoid(logits)
    assert torch.allclose(prob[:, 0], h[:, 0])
    assert torch.allclose(prob[:, 1], survival[:, 0] * h[:, 1])
    assert torch.allclose(prob[:, 3], survival[:, 2])


# ------------------------------------------------------------------------------- settings


def _method(**variant):
    return {
        "outcomes": {"diagnosis": "disease", "survival": "survival"},
        "train": {"classification": {"epochs": 3}, "diagnosis": {"class_weights": [1.0, 2.0]}},
        "variants": {"ours": {"model": "ksfusion", **variant}, "snn": {"model": "snn"}},
    }


def test_recipes_layer_paper_kind_task_and_variant():
    method = _method(train={"lr": 0.01})
    diagnosis = recipe(method, "ours", "diagnosis")
    assert diagnosis["epochs"] == 3 and diagnosis["lr"] == 0.01
    assert diagnosis["class_weights"] == [1.0, 2.0] and diagnosis["weight_decay"] == 0.1
    survival = train_settings_of(method, "ours", "survival")
    assert survival.epochs == 10 and survival.class_weights == "none"
    assert (survival.monitor, survival.monitor_mode) == ("val_cindex", "max")
    assert train_settings_of(method, "snn", "diagnosis").monitor == "val_loss"


def test_only_the_proposed_model_coordinates_gradients():
    assert uses_cg_coord(_method(), "ours")
    assert not uses_cg_coord(_method(cg_coord=False), "ours")
    assert not uses_cg_coord(_method(), "snn")


# ------------------------------------------------------------------------- feature stores


def _store(folder, image_id, n=3, scales=("20x", "10x")):
    from mmdiag.features.store import write_feature_store

    features = np.arange(n * len(scales) * 2, dtype=np.float32).reshape(n, len(scales), 2)
    write_feature_store(
        folder / f"{image_id}.zarr",
        features,
        patch_id=np.arange(n),
        centre_xy=np.stack([np.arange(n) * 256, np.zeros(n)], axis=1),
        attrs={"image_id": image_id, "scales": list(scales)},
    )
    return features


def test_slide_features_are_read_per_sample_at_the_chosen_scale(tmp_path):
    samples = _samples()
    stores = tmp_path / "stores"
    written = {i: _store(stores, i) for i in ("wsi/P1-1", "wsi/P1-2", "wsi/P2-1")}
    features = data.slide_features(samples, stores, "10x", "manifest.tsv")
    assert sorted(features) == ["P1-1", "P1-2", "P2-1"]
    assert np.array_equal(features["P1-2"][0], written["wsi/P1-2"][:, 1])
    assert features["P1-1"][1][:, 0].tolist() == [0, 256, 512]
    with pytest.raises(ValueError, match="no scale '5x'"):
        data.slide_features(samples, stores, "5x", "manifest.tsv")
    _store(stores, "wsi/P9-1")  # a slide the manifest does not hold
    with pytest.raises(ValueError, match=r"P9-1.*is not a slide of manifest.tsv"):
        data.slide_features(samples, stores, None, "manifest.tsv")


def test_a_slide_without_features_is_named(tmp_path):
    stores = tmp_path / "stores"
    _store(stores, "wsi/P1-1")
    with pytest.raises(ValueError, match=r"no patch features for 2 slides .*P1-2"):
        data.slide_features(_samples(), stores, None, "manifest.tsv")


# ------------------------------------------------------------------------- config checks

_CONFIGS = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"outcomes": {"diagnosis": "who"}}, r"outcomes.diagnosis: 'who' is not a task"),
        ({"variants": {"snn": {"model": "snn", "cg_coord": False}}}, "only the ksfusion model"),
        (
            {"train": {"grading": {"class_weights": [1.0, 2.0]}}},
            "2 class weights for task 'grading'",
        ),
        ({"figures": {"roc": ["nope"]}}, "'nope' is not a variant"),
        ({"network": {"ksfuson": {}}}, "'ksfuson' is not allowed"),
    ],
)
def test_config_mistakes_are_named(tmp_path, override, message):
    import yaml

    from mmdiag.config import ConfigError, load_config

    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"methods": {"ksfusion": override}}))
    files = [_CONFIGS / "config.yaml", *sorted((_CONFIGS / "methods").glob("*.yaml")), extra]
    with pytest.raises(ConfigError, match=message):
        load_config(files)
