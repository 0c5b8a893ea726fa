"""Patch features (one encoder per scale) and per-patient phenotype clusters."""

import json
import re

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from typer.testing import CliRunner

from mmdiag.cli import app
from mmdiag.features.extract import ExtractSettings, extract_cohort_features
from mmdiag.features.phenotypes import CLUSTER_COLUMNS, cluster_patients, kmeans_labels
from mmdiag.features.store import open_feature_store, write_feature_store
from mmdiag.io.atomic import sha256_file
from mmdiag.patching.store import open_patch_store
from mmdiag.ssl.augment import IMAGENET_MEAN, IMAGENET_STD

from .ssl_helpers import torch_threads, write_textured_store

SCALES = ("20x", "10x")
DIM = 96  # test_resnet's feature width


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    """A differently initialised test_resnet per scale, saved as pretraining saves it."""
    folder = tmp_path_factory.mktemp("encoders")
    paths = {}
    for seed, scale in enumerate(SCALES):
        torch.manual_seed(100 + seed)
        model = timm.create_model("test_resnet", num_classes=0)
        state = model.state_dict()
        for key, value in state.items():  # BN statistics and affines away from 0 and 1
            if key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
                value += 0.1 * torch.randn_like(value)
            elif key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
                value *= 1 + 0.2 * torch.rand_like(value)
        paths[scale] = str(folder / f"{scale}.safetensors")
        save_file(state, paths[scale])
    return paths


@pytest.fixture(scope="module")
def patch_stores(tmp_path_factory):
    """Two slides of 13 and 6 patches."""
    folder = tmp_path_factory.mktemp("patches")
    return [
        write_textured_store(folder / f"slide{i}.zarr", n, seed=3 + i) for i, n in [(0, 13), (1, 6)]
    ]


def _settings(**overrides) -> ExtractSettings:
    values = dict(backbone="test_resnet", batch_size=5, workers=0, amp=False, device="cpu")
    return ExtractSettings(**{**values, "channels_last": False, **overrides})


def _extract(stores, encoders, out_dir, image_ids=None, **overrides) -> dict:
    image_ids = image_ids or [f"img-{i}" for i in range(len(stores))]
    return extract_cohort_features(
        stores, image_ids, encoders, _settings(**overrides), out_dir=out_dir, progress=False
    )


def _reference_features(pixels: np.ndarray, weights: str, image_px) -> torch.Tensor:
    """The encoder applied to the patches directly, preprocessed with torchvision."""
    encoder = timm.create_model("test_resnet", num_classes=0)
    encoder.load_state_dict(load_file(weights))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    if image_px:
        images = TF.resize(images, [image_px, image_px], antialias=True)
    images = TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))
    with torch.no_grad():
        return encoder.eval()(images)


@pytest.mark.parametrize(
    "overrides", [{}, {"image_px": 24}, {"channels_last": True, "batch_size": 13}]
)
def test_features_equal_the_encoder_applied_to_each_patch(
    patch_stores, encoders, tmp_path, overrides
):
    report = _extract(patch_stores, encoders, tmp_path / "features", **overrides)
    assert report["patches"] == (13 + 6) * 2  # patch-scales
    for index, path in enumerate(patch_stores):
        stored = open_feature_store(tmp_path / "features" / f"img-{index}.zarr")
        patches = open_patch_store(path)
        for column, scale in enumerate(SCALES):
            pixels = patches.pixels(scale, slice(None))
            image_px = overrides.get("image_px")
            expected = _reference_features(pixels, encoders[scale], image_px).numpy()
            np.testing.assert_allclose(stored.features[:, column], expected, rtol=0, atol=1e-5)
        # each scale used its own encoder: the columns differ
        assert not np.allclose(stored.features[:, 0], stored.features[:, 1], atol=1e-3)


def test_feature_store_round_trip(patch_stores, encoders, tmp_path):
    out_dir = tmp_path / "features"
    _extract(patch_stores, encoders, out_dir, image_ids=["slide-b", "slide-a"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["slide-a.zarr", "slide-b.zarr"]
    stored = open_feature_store(out_dir / "slide-b.zarr")
    patches = open_patch_store(patch_stores[0])
    assert stored.features.shape == (13, 2, DIM) and stored.features.dtype == np.float32
    assert len(stored) == 13 and stored.scales == list(SCALES) and stored.image_id == "slide-b"
    np.testing.assert_array_equal(stored.patch_id, patches.grid["patch_id"].to_numpy())
    grid = patches.grid
    centre = np.column_stack([grid["x_20x"] + grid["size_20x"] // 2, grid["y_20x"] + 16])
    np.testing.assert_array_equal(stored.centre_xy, centre)
    np.testing.assert_array_equal(stored.centre_xy[:, 0], np.arange(13) * 32 + 16)
    assert stored.attrs["patch_store"] == str(patch_stores[0])
    assert stored.attrs["backbone"] == "test_resnet" and stored.attrs["complete"] is True
    assert stored.attrs["encoders"] == {
        scale: {"path": path, "sha256": sha256_file(path)} for scale, path in encoders.items()
    }
    assert open_feature_store(out_dir / "slide-a.zarr").features.shape == (6, 2, DIM)
    assert [p.name for p in tmp_path.iterdir()] == ["features"]  # no temporary leftovers


def test_missing_or_incomplete_feature_store_is_named(tmp_path):
    missing = tmp_path / "missing.zarr"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        open_feature_store(missing)
    partial = write_feature_store(
        tmp_path / "partial.zarr",
        np.zeros((2, 1, 4)),
        patch_id=np.arange(2),
        centre_xy=np.zeros((2, 2)),
        attrs={"image_id": "a", "scales": ["20x"]},
    )
    del zarr.open_group(partial, mode="r+").attrs["complete"]
    with pytest.raises(ValueError, match=re.escape(str(partial)) + ".*incomplete"):
        open_feature_store(partial)


def test_missing_incomplete_or_pixel_less_patch_store_is_named(patch_stores, encoders, tmp_path):
    missing = tmp_path / "nothing.zarr"
    partial = write_textured_store(tmp_path / "partial.zarr", 4, seed=1)
    del zarr.open_group(partial, mode="r+").attrs["complete"]
    bare = write_textured_store(tmp_path / "bare.zarr", 4, seed=1, with_pixels=False)
    for bad, message in [(missing, "cannot open"), (partial, "incomplete"), (bare, "no pixels")]:
        with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + message):
            _extract([patch_stores[0], bad], encoders, tmp_path / "features")
        assert not (tmp_path / "features").exists()  # nothing half-written


def test_missing_scale_encoder_is_refused(patch_stores, encoders, tmp_path):
    store = re.escape(str(patch_stores[0]))
    with pytest.raises(ValueError, match=store + r".*no encoder for scale\(s\) \['10x'\]"):
        _extract(patch_stores, {"20x": encoders["20x"]}, tmp_path / "features")
    assert not (tmp_path / "features").exists()


def test_empty_patch_store_gives_an_empty_feature_array(patch_stores, encoders, tmp_path):
    empty = write_textured_store(tmp_path / "empty.zarr", 0, seed=0)
    _extract([empty, patch_stores[1]], encoders, tmp_path / "features")
    stored = open_feature_store(tmp_path / "features" / "img-0.zarr")
    assert stored.features.shape == (0, 2, DIM)
    assert stored.patch_id.shape == (0,) and stored.centre_xy.shape == (0, 2)
    assert open_feature_store(tmp_path / "features" / "img-1.zarr").features.shape == (6, 2, DIM)


# ----------------------------------------------------------------------------- clusters


def _blobs(n: int, seed: int, dim: int = 6) -> np.ndarray:
    """Points around 4 well separated centres, plus a second scale column of noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (4, dim))
    first = centres[rng.integers(0, 4, n)] + rng.normal(0, 0.5, (n, dim))
    return np.stack([first, rng.normal(0, 1, (n, dim))], axis=1).astype(np.float32)


def _feature_store(path, image_id: str, features: np.ndarray):
    return write_feature_store(
        path,
        features,
        patch_id=np.arange(len(features)) + 100,
        centre_xy=np.zeros((len(features), 2)),
        attrs={"image_id": image_id, "scales": list(SCALES)},
    )


@pytest.fixture
def cohort(tmp_path):
    """Patient P1 has two slides (b before a on purpose), P2 one, P3 a slide of 3 patches."""
    features = {
        "s-b": _blobs(30, 1),
        "s-a": _blobs(25, 2),
        "s-c": _blobs(40, 3),
        "s-d": _blobs(3, 4),
    }
    paths = [_feature_store(tmp_path / f"{k}.zarr", k, v) for k, v in features.items()]
    patients = {"s-a": "P1", "s-b": "P1", "s-c": "P2", "s-d": "P3"}
    return paths, patients, features


def _sklearn_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(features.astype(float))


def test_clusters_are_sklearn_kmeans_per_patient(cohort):
    paths, patients, features = cohort
    table = cluster_patients(paths, patients, n_clusters=4, seed=0)
    assert list(table.columns[: len(CLUSTER_COLUMNS)]) == CLUSTER_COLUMNS
    assert len(table) == 98
    p1 = table[table["patient_id"] == "P1"]
    assert p1["image_id"].tolist() == ["s-a"] * 25 + ["s-b"] * 30  # slides in image_id order
    assert p1["patch_index"].tolist() == [*range(25), *range(30)]
    together = np.concatenate([features["s-a"][:, 0], features["s-b"][:, 0]])
    np.testing.assert_array_equal(p1["cluster"], _sklearn_labels(together, 4, 0))
    p2 = table[table["patient_id"] == "P2"]
    np.testing.assert_array_equal(p2["cluster"], _sklearn_labels(features["s-c"][:, 0], 4, 0))
    assert (p2["patch_id"] == np.arange(40) + 100).all()
    assert set(table.loc[table["patient_id"] != "P3", "k"]) == {4}


def test_clusters_are_deterministic_and_seeded(cohort):
    paths, patients, features = cohort
    first = cluster_patients(paths, patients, n_clusters=4, seed=0)
    again = cluster_patients(list(reversed(paths)), patients, n_clusters=4, seed=0)
    assert first.equals(again)
    other_seed = cluster_patients(paths, patients, n_clusters=4, seed=7)
    p2 = other_seed[other_seed["patient_id"] == "P2"]["cluster"]
    np.testing.assert_array_equal(p2, _sklearn_labels(features["s-c"][:, 0], 4, 7))


def test_few_patches_get_one_cluster_each_and_record_k(cohort):
    paths, patients, _ = cohort
    table = cluster_patients(paths, patients, n_clusters=8, seed=0)
    p3 = table[table["patient_id"] == "P3"]
    assert sorted(p3["cluster"]) == [0, 1, 2] and set(p3["k"]) == {3}
    assert set(table.loc[table["patient_id"] == "P1", "k"]) == {8}
    assert kmeans_labels(np.zeros((0, 4)), 8, 0).shape == (0,)


def test_clusters_use_the_requested_scale(cohort):
    paths, patients, features = cohort
    table = cluster_patients(paths, patients, n_clusters=3, seed=0, scale="10x")
    p2 = table[table["patient_id"] == "P2"]
    np.testing.assert_array_equal(p2["cluster"], _sklearn_labels(features["s-c"][:, 1], 3, 0))
    for column, scale in enumerate(SCALES):  # per-scale columns, where the table has them
        if f"cluster_{scale}" in table:
            expected = _sklearn_labels(features["s-c"][:, column], 3, 0)
            np.testing.assert_array_equal(p2[f"cluster_{scale}"], expected)


def test_unknown_image_id_is_named(cohort):
    paths, patients, _ = cohort
    del patients["s-c"]
    with pytest.raises(ValueError, match=re.escape(str(paths[2])) + ".*'s-c'"):
        cluster_patients(paths, patients)


# ----------------------------------------------------------------------------- CLI


def test_cli_rejects_a_malformed_encoder_argument(patch_stores, tmp_path):
    settings = {"features": {}, "ssl": {"backbone": "test_resnet"}}
    result = CliRunner().invoke(
        app,
        [
            "extract-features", str(patch_stores[0]), "--manifest", str(tmp_path / "m.tsv"),
            "--encoder", "20x:/tmp/enc.safetensors", "--out-dir", str(tmp_path / "features"),
            "--settings-json", json.dumps(settings),
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "--encoder '20x:/tmp/enc.safetensors': expected SCALE=PATH" in result.output
    assert not (tmp_path / "features").exists()
