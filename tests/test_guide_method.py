"""DeepGuide as a method: the training recipes and config checks, its data (MR sequences,
crops, WSI feature bags, latents), the latent kinds on the feature toy where guidance must
help, the image kinds on real NIfTI volumes and feature stores, and the leakage guards."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from mmdiag.cli_support import default_config_files
from mmdiag.config import load_config, validate_config
from mmdiag.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from mmdiag.data.splits import make_splits, write_splits
from mmdiag.features.store import write_feature_store
from mmdiag.io import read_tsv, write_tsv
from mmdiag.methods.guide import data
from mmdiag.methods.guide.fold import FoldInputs, run_guide_fold, upstream_folders
from mmdiag.methods.guide.settings import (
    PAPER_RECIPES,
    config_problems,
    recipe,
    train_settings_of,
    upstream,
)
from mmdiag.models.guide import ClamSB
from mmdiag.synth.guide_toy import guidance_toy_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["glioblastoma", "oligodendroglioma", "astrocytoma"]


def _config() -> dict:
    return load_config(default_config_files(ROOT))


def _method() -> dict:
    return copy.deepcopy(_config()["methods"]["guide"])


# --------------------------------------------------------------------------- settings


def test_recipes_are_the_supplements_table_with_config_and_variant_overrides():
    settings = _method()
    # the demo config overrides P's epochs, the variant nothing: Adam 1e-4 stays the paper's
    # batch 1 and balanced sampler
    superior = recipe(settings, "p")
    assert superior["epochs"] == 40 and superior["batch_size"] == 1
    assert superior["sampler"] == "balanced" and superior["optimizer"] == "adam"
    settings["variants"]["p"]["train"] = {"batch_size": 2}
    assert recipe(settings, "p")["batch_size"] == 2 and recipe(settings, "p")["epochs"] == 40
    # the control retrains a head with the guided classifier's recipe
    assert recipe(settings, "rh_all") == recipe(settings, "gr_all")
    # G: SGD lr 0.5, no patience: every epoch, the last one kept, no validation needed
    guidance = train_settings_of(settings, "g_all")
    assert (guidance.optimizer, guidance.lr, guidance.epochs) == ("sgd", 0.5, 150)
    assert not guidance.needs_validation and not guidance.restore_best
    guided = train_settings_of(settings, "gr_all")
    assert guided.early_stopping_patience == 200 and guided.restore_best
    assert guided.monitor == "val_loss" and guided.scheduler == "none"
    assert PAPER_RECIPES["guided"]["class_weights"] == (1.0, 1.7, 1.6)


def test_a_guided_variant_reads_its_guidance_and_that_guidance_s_inferior():
    settings = _method()
    assert upstream(settings, "gr_all") == {"guidance": "g_all", "inferior": "r_all"}
    assert upstream(settings, "g_t1ce") == {"inferior": "r_t1ce", "superior": "p"}
    assert upstream(settings, "pr_all") == {"inferior": "r_all", "superior": "p"}
    assert upstream(settings, "p") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v["gr_all"].update(guidance="r_all"), r"gr_all.guidance: 'r_all' is not one of"),
        (lambda v: v["g_all"].update(superior="r_all"), r"g_all.superior: 'r_all' is not one of"),
        (lambda v: v["p"].update(inferior="r_all"), "a superior variant reads no inferior"),
        (lambda v: v["r_all"].update(sequence="dwi"), "r_all.sequence: 'dwi' is not one of"),
        (lambda v: v["g_all"].update(sequence="t1"), "only an inferior variant reads a sequence"),
        (lambda v: v["rh_all"].update(train={"class_weights": [1.0, 2.0]}), "2 class weights"),
    ],
)
def test_config_problems_name_the_key(change, message):
    config = _config()
    change(config["methods"]["guide"]["variants"])
    problems = list(config_problems("guide", config["methods"]["guide"], config))
    assert any(re.search(message, p) for p in problems), problems
    with pytest.raises(ValueError, match="guide"):
        validate_config(config)


# --------------------------------------------------------------------------- data


def _manifest_frame(patients: dict[str, str], rows_of=lambda pid: [("MR", f"mr/{pid}_t1")]):
    records = []
    for pid, disease in patients.items():
        for modality, image_id in rows_of(pid):
            records.append(
                {
                    "patient_id": pid, "modality": modality, "image_id": image_id,
                    "path": f"/cohort/{image_id}.nii.gz", "sha256": "0" * 64,
                    "width_px": 32, "height_px": 32, "disease": disease, "mn_stage": "",
                    "survival_months": "", "event": "", "mpp": "",
                }
            )  # fmt: skip
    return pd.DataFrame(records, columns=MANIFEST_COLUMNS)


def test_sequences_are_found_by_suffix_and_a_missing_one_names_the_patient():
    suffixes = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair"}
    frame = _manifest_frame(
        {"A": CLASSES[0], "B": CLASSES[1]},
        lambda pid: (
            [("MR", f"mr/{pid}_{s}") for s in ("t1", "t1ce", "t2", "flair")]
            + [("WSI", f"wsi/{pid}")]
        ),
    )
    paths = data.sequence_paths(frame, suffixes, ["t1ce", "flair"], "m.tsv")
    assert [p.name for p in paths["A"]] == ["A_t1ce.nii.gz", "A_flair.nii.gz"]
    # _t1 is not confused with _t1ce: the suffix must end the id
    assert [p.name for p in data.sequence_paths(frame, suffixes, ["t1"], "m.tsv")["B"]] == [
        "B_t1.nii.gz"
    ]
    broken = frame[~((frame["patient_id"] == "B") & frame["image_id"].str.endswith("_flair"))]
    with pytest.raises(ValueError, match=r"(?s)m.tsv.*patient B: 0 MR images end with '_flair'"):
        data.sequence_paths(broken, suffixes, ["flair"], "m.tsv")


def test_crops_are_centred_in_evaluation_and_seeded_per_sample_in_training():
    volume = np.arange(2 * 6 * 8 * 10, dtype=np.float32).reshape(2, 6, 8, 10)
    case = data.Case("A", 1, volume)
    collate = data.volume_collate((4, 4, 4))
    centred = collate([case], None)["volume"][0].numpy()
    np.testing.assert_array_equal(centred, volume[:, 1:5, 2:6, 3:7])
    first = collate([case], [torch.Generator().manual_seed(3)])["volume"]
    again = collate([case], [torch.Generator().manual_seed(3)])["volume"]
    corners = [
        collate([case], [torch.Generator().manual_seed(s)])["volume"][0, 0, 0, 0, 0].item()
        for s in range(20)
    ]
    torch.testing.assert_close(first, again)
    assert len(set(corners)) > 5  # positions vary with the seed
    with pytest.raises(ValueError, match="crop 12 is larger than the volume's 10 voxels"):
        data.volume_collate((4, 4, 12))([case], None)


def test_bags_pool_every_slide_of_a_patient_and_pad_with_counts(tmp_path):
    frame = _manifest_frame(
        {"A": CLASSES[0], "B": CLASSES[1]},
        lambda pid: [("WSI", f"wsi/{pid}_s1"), ("WSI", f"wsi/{pid}_s2")] if pid == "A"
        else [("WSI", f"wsi/{pid}_s1")],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    sizes = {"wsi/A_s1": 3, "wsi/A_s2": 2, "wsi/B_s1": 4}
    for image_id, n in sizes.items():
        write_feature_store(
            tmp_path / f"{image_id}.zarr",
            rng.normal(size=(n, 2, 5)),
            patch_id=np.arange(n),
            centre_xy=np.zeros((n, 2)),
            attrs={"image_id": image_id, "scales": ["20x", "10x"]},
        )
    bags = data.patient_bags(frame, tmp_path, "10x", "m.tsv")
    assert {k: len(v) for k, v in bags.items()} == {"A": 5, "B": 4}
    cases = data.bag_cases({"A": 0, "B": 1}, bags, tmp_path)
    batch = data.bag_collate(cases)
    assert batch["features"].shape == (2, 5, 5) and batch["n_patches"].tolist() == [5, 4]
    assert batch["features"][1, 4].abs().sum() == 0
    with pytest.raises(ValueError, match="no scale '5x'"):
        data.patient_bags(frame, tmp_path, "5x", "m.tsv")
    with pytest.raises(ValueError, match=r"patients \['C'\] have no WSI patch features"):
        data.bag_cases({"C": 0}, bags, tmp_path)


def test_latent_collate_cuts_named_parts_and_leaves_out_absent_ones():
    collate = data.latent_collate((("z_inferior", 3), ("z_superior", 2)))
    full = collate([data.Case("A", 2, np.arange(5, dtype=np.float32))])
    assert full["z_inferior"].tolist() == [[0, 1, 2]] and full["z_superior"].tolist() == [[3, 4]]
    inferior_only = collate([data.Case("A", 2, np.arange(3, dtype=np.float32))])
    assert set(inferior_only) == {"z_inferior", "label"}


# --------------------------------------------------------------------------- the feature toy


def _toy_cohort(tmp_path: Path, n_patients: int = 240, seed: int = 0):
    """A manifest, a split and upstream fold folders holding the toy's latents: z_I on rings,
    z_S one-hot, and a CLAM checkpoint whose D_S reads the one-hot code."""
    labels = np.arange(n_patients) % 3
    patients = {f"T{i:03d}": CLASSES[c] for i, c in enumerate(labels)}
    manifest = tmp_path / "manifest.tsv"
    write_manifest(_manifest_frame(patients), manifest)
    scheme = {"type": "repeated", "n_repeats": 1, "fractions": [0.75, 0.125, 0.125]}
    splits = make_splits(read_manifest(manifest), "toy", scheme | {"label": "disease"}, seed=seed)
    write_splits(splits, tmp_path / "splits.json")
    z_inferior, z_superior = guidance_toy_latents(labels, seed=seed)
    ids = list(patients)
    results = tmp_path / "results"
    for variant, z in (("r_all", z_inferior), ("p", z_superior)):
        folder = results / variant / "fold_0"
        folder.mkdir(parents=True)
        save_file({"z": torch.from_numpy(z)}, str(folder / data.LATENTS_FILE))
        write_tsv(pd.DataFrame({"patient_id": ids}), folder / data.LATENT_IDS_FILE)
    clam = ClamSB(4, 3, hidden_dim=z_superior.shape[1], attention_dim=4)
    with torch.no_grad():
        clam.classifier.weight.zero_()
        clam.classifier.weight[:, :3] = 4.0 * torch.eye(3)
        clam.classifier.bias.zero_()
    save_model(clam, str(results / "p" / "fold_0" / "model.safetensors"))
    save_model(torch.nn.Linear(1, 1), str(results / "r_all" / "fold_0" / "model.safetensors"))
    return manifest, tmp_path / "splits.json", results


def _run(variant, manifest, splits, results, settings, fold=0):
    out = results / variant / f"fold_{fold}"
    inputs = FoldInputs(
        manifest=manifest,
        splits=splits,
        upstream=upstream_folders(settings, variant, results, fold),
    )
    return run_guide_fold(
        inputs=inputs, fold=fold, variant=variant, method_settings=settings, classes=CLASSES,
        out_dir=out,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("guide_toy")
    manifest, splits, results = _toy_cohort(tmp_path)
    settings = _method()  # the demo G ([32, 16, 16]) on the toy's 8-d z_I and 6-d z_S
    metrics = {
        v: _run(v, manifest, splits, results, settings) for v in ("g_all", "gr_all", "rh_all")
    }
    return {"manifest": manifest, "splits": splits, "results": results, "settings": settings,
            "metrics": metrics}  # fmt: skip


def test_guidance_helps_where_the_class_is_nonlinear_in_z_inferior(toy):
    metrics = toy["metrics"]
    # a linear head on rings cannot beat chance by much; G maps the radius to the one-hot z_S
    assert metrics["rh_all"]["BACC"] < 0.6, metrics
    assert metrics["gr_all"]["BACC"] > 0.85, metrics
    assert metrics["gr_all"]["BACC"] > metrics["rh_all"]["BACC"] + 0.3
    # G(I) alone: the superior's frozen D_S on G(z_I) ranks the classes (its arg-max is
    # weaker: an imperfect reconstruction, as the paper observes of row 4)
    assert metrics["g_all"]["AUC"] > 0.9, metrics
    log = read_tsv(toy["results"] / "g_all" / "fold_0" / "train_log.tsv")
    assert len(log) == 150 and log["train_loss"].iloc[-1] < 0.6 * log["train_loss"].iloc[0]


def test_the_guided_classifier_keeps_the_guidance_variant_s_g_frozen(toy):
    results = toy["results"]
    guided = load_file(str(results / "gr_all" / "fold_0" / "model.safetensors"))
    guidance = load_file(str(results / "g_all" / "fold_0" / "model.safetensors"))
    shared = [k for k in guided if k.startswith("guidance.")]
    assert shared
    for key in shared:
        torch.testing.assert_close(guided[key], guidance[key])
    # D_S travels with G(R) frozen: the CLAM checkpoint's classifier
    clam = load_file(str(results / "p" / "fold_0" / "model.safetensors"))
    torch.testing.assert_close(guidance["superior_decoder.weight"], clam["classifier.weight"])


def test_test_labels_never_reach_the_latent_kinds(toy, tmp_path):
    """Permuting the test patients' labels in the manifest changes y_true only: every
    probability and prediction of G(R) + R is the same (training and validation unchanged)."""
    from mmdiag.data.splits import load_fold

    fold = load_fold(toy["splits"], 0)
    frame = read_manifest(toy["manifest"])
    test = frame["patient_id"].isin(fold["test"])
    frame.loc[test, "disease"] = frame.loc[test, "disease"].map(
        {CLASSES[0]: CLASSES[1], CLASSES[1]: CLASSES[2], CLASSES[2]: CLASSES[0]}
    )
    permuted = tmp_path / "manifest.tsv"
    write_manifest(frame, permuted)
    results = tmp_path / "results"
    for variant in ("r_all", "p", "g_all"):
        shutil.copytree(toy["results"] / variant, results / variant)
    _run("gr_all", permuted, toy["splits"], results, toy["settings"])
    before = read_tsv(toy["results"] / "gr_all" / "fold_0" / "predictions.tsv")
    after = read_tsv(results / "gr_all" / "fold_0" / "predictions.tsv")
    probabilities = [c for c in before if c.startswith("prob_")] + ["y_pred", "patient_id"]
    pd.testing.assert_frame_equal(before[probabilities], after[probabilities])
    assert (before["y_true"] != after["y_true"]).all()


# --------------------------------------------------------------------------- image kinds


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """A real 18-patient RadPath-like cohort (NIfTI MR + SVS) with its manifest and split,
    and feature stores whose patches carry a planted class direction."""
    from mmdiag.data.manifest import build_manifest
    from mmdiag.synth.radpath import RadPathSettings, manifest_rules, write_radpath_cohort

    tmp_path = tmp_path_factory.mktemp("guide_small")
    root = write_radpath_cohort(
        tmp_path / "raw", RadPathSettings(n_patients=18, seed=1, slide_px=256)
    )
    frame = build_manifest(cohort_root=root, rules=manifest_rules())
    manifest = write_manifest(frame, tmp_path / "manifest.tsv")
    scheme = {"type": "repeated", "n_repeats": 1, "fractions": [0.6, 0.2, 0.2], "label": "disease"}
    write_splits(make_splits(frame, "small", scheme, seed=0), tmp_path / "splits.json")
    rng = np.random.default_rng(0)
    stores = tmp_path / "stores"
    for row in frame[frame["modality"] == "WSI"].itertuples():
        features = rng.normal(0.0, 1.0, (10, 1, 12))
        features[:3, 0, CLASSES.index(row.disease)] += 3.0  # 3 of 10 patches show the class
        write_feature_store(
            stores / f"{row.image_id}.zarr", features, patch_id=np.arange(10),
            centre_xy=np.zeros((10, 2)), attrs={"image_id": row.image_id, "scales": ["20x"]},
        )  # fmt: skip
    return {"manifest": manifest, "splits": tmp_path / "splits.json", "stores": stores,
            "results": tmp_path / "results", "frame": frame}  # fmt: skip


def _small_settings() -> dict:
    settings = _method()
    settings["inferior"] |= {"volume_vox": [12, 16, 16], "crop_vox": [10, 14, 14]}
    settings["network"]["densenet"] = {"init_features": 4, "growth_rate": 4,
                                       "block_config": [1, 1], "dropout": 0.0,
                                       "checkpointing": False}  # fmt: skip
    settings["train"]["inferior"] |= {"epochs": 2, "batch_size": 4}
    settings["train"]["superior"] |= {"epochs": 30, "patience": 30, "lr": 2e-3}
    return settings


def test_the_inferior_writes_evaluation_mode_latents_of_every_patient(small_cohort):
    from mmdiag.data.splits import load_fold
    from mmdiag.models.guide import DenseNetVolumeClassifier
    from mmdiag.training.stages import load_stage

    settings, results = _small_settings(), small_cohort["results"]
    inputs = FoldInputs(manifest=small_cohort["manifest"], splits=small_cohort["splits"])
    run_guide_fold(inputs=inputs, fold=0, variant="r_all", method_settings=settings,
                   classes=CLASSES, out_dir=results / "r_all" / "fold_0")  # fmt: skip
    folder = results / "r_all" / "fold_0"
    latents = data.read_latents(folder)
    fold = load_fold(small_cohort["splits"], 0)
    assert set(latents) == {p for part in data.PARTS for p in fold[part]}
    # the stored latent of a test patient is the checkpoint's E_I on its centred crop, the same
    # alone as in any batch: evaluation mode, no batch statistics of single samples
    model = DenseNetVolumeClassifier(4, 3, **settings["network"]["densenet"])
    load_stage(model, folder / "model.safetensors")
    paths = data.sequence_paths(
        small_cohort["frame"], settings["inferior"]["sequences"], ["t1", "t1ce", "t2", "flair"], "m"
    )
    patient = fold["test"][0]
    case = data.volume_cases({patient: 0}, paths, settings["inferior"]["volume_vox"], "m")
    volume = data.volume_collate(settings["inferior"]["crop_vox"])(case, None)["volume"]
    with torch.no_grad():
        expected = model.eval().encode(volume)[0].numpy()
    np.testing.assert_allclose(latents[patient], expected, rtol=1e-4, atol=1e-5)
    predictions = read_tsv(folder / "predictions.tsv")
    assert sorted(predictions["patient_id"]) == sorted(fold["test"])


def test_the_superior_learns_the_planted_patches_and_writes_z_s(small_cohort):
    settings, results = _small_settings(), small_cohort["results"]
    inputs = FoldInputs(manifest=small_cohort["manifest"], splits=small_cohort["splits"],
                        feature_stores=small_cohort["stores"])  # fmt: skip
    metrics = run_guide_fold(inputs=inputs, fold=0, variant="p", method_settings=settings,
                             classes=CLASSES, out_dir=results / "p" / "fold_0")  # fmt: skip
    assert metrics["AUC"] > 0.9, metrics  # chance 0.5: a broken attention MIL cannot
    latents = data.read_latents(results / "p" / "fold_0")
    assert {len(z) for z in latents.values()} == {settings["network"]["clam"]["hidden_dim"]}
    assert min(z.min() for z in latents.values()) >= 0  # attention-pooled ReLU features
    state = load_file(str(results / "p" / "fold_0" / "model.safetensors"))
    assert state["classifier.weight"].shape == (3, 64)


def test_a_crop_too_small_for_the_dense_blocks_is_a_config_error():
    config = _config()
    config["methods"]["guide"]["network"]["densenet"]["block_config"] = [3, 3, 3, 3]
    problems = list(config_problems("guide", config["methods"]["guide"], config))
    assert any("crop_vox: [20, 28, 28] is too small" in p and ">= 32" in p for p in problems)
