"""CT sequences paired with same-patient WSI sequences on a small synthetic TET cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from mmdiag.data.paired_sequences import (
    SequenceSettings,
    Standardiser,
    build_paired_datasets,
    collate_paired,
    cut_patient_ct,
    read_cohort_patients,
    read_lesion_table,
    read_wsi_sequence,
    slide_wsi_sequences,
)
from mmdiag.models.mhd import MHDTeacher
from mmdiag.patching.store import write_patch_store
from mmdiag.synth.tet import WHO_TYPES, TetSettings, write_tet_cohort
from mmdiag.volumes import read_volume, sequence_bounds

# Raw WSI pixels, so that the tests can read them back as the store wrote them.
SETTINGS = SequenceSettings(depth=8, size=32, wsi_standardise=False)
K = len(WHO_TYPES)
PATCH_PX = 16
# Slide 1 has 4 x 5 patches (two full sequences of 8), slide 2 five (one, last repeated).
SLIDE_SHAPES = {1: (4, 5), 2: (1, 5)}


def _store(path, patient_number: int, slide: int, rng: np.random.Generator):
    """A patch store whose pixels say whose they are: channel 0 the patient, 1 the slide and
    2 the patch's rank in reading order; grid rows are shuffled away from that order."""
    rows, cols = SLIDE_SHAPES[slide]
    y, x = np.divmod(np.arange(rows * cols), cols)
    shuffle = rng.permutation(rows * cols)
    y, x = y[shuffle], x[shuffle]
    size = 32
    grid = pd.DataFrame(
        {
            "patch_id": y * cols + x,
            "x_20x": x * size,
            "y_20x": y * size,
            "size_20x": np.full(len(x), size),
            "tissue_fraction": np.ones(len(x)),
        }
    )
    pixels = np.zeros((len(x), PATCH_PX, PATCH_PX, 3), np.uint8)
    pixels[..., 0] = 20 * patient_number
    pixels[..., 1] = 50 * slide
    pixels[..., 2] = (y * cols + x)[:, None, None]
    return write_patch_store(path, grid, attrs={"slide_path": str(path)}, pixels={"20x": pixels})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Eight patients (one per type), 64-slice CTs, two small patch stores each."""
    root = tmp_path_factory.mktemp("tet") / "cohort"
    settings = TetSettings(
        n_patients=8, ct_shape_vox=(24, 24, 64), slide_px=64, n_levels=1, tile_px=64
    )
    write_tet_cohort(root, settings)
    rng = np.random.default_rng(0)
    pids = sorted(pd.read_csv(root / "clinical.tsv", sep="\t")["patient_id"])
    stores = {
        pid: [_store(root / f"{pid}_s{s}.zarr", n + 1, s, rng) for s in SLIDE_SHAPES]
        for n, pid in enumerate(pids)
    }
    fold = {"fold": 0, "train": pids[:6], "val": [], "test": pids[6:]}
    return root, stores, fold


def _patients(cohort, lesions="table"):
    root, stores, _ = cohort
    return read_cohort_patients(root, stores, lesions=lesions)


def _labels(patient):
    return [(s.start, s.class_index) for s in cut_patient_ct(patient, WHO_TYPES, SETTINGS)]


def test_lesion_table_is_half_open_and_matches_the_mask(cohort, tmp_path):
    root = cohort[0]
    table = pd.read_csv(root / "lesions.tsv", sep="\t")
    ranges = read_lesion_table(root / "lesions.tsv")
    for row in table.itertuples():
        assert ranges[row.patient_id] == (row.z_start, row.z_stop - 1)
    for by_table, by_mask in zip(_patients(cohort), _patients(cohort, "mask"), strict=True):
        assert _labels(by_table) == _labels(by_mask)
        first, last = by_table.lesion_z_range
        tumour = [s for s in cut_patient_ct(by_table, WHO_TYPES, SETTINGS) if s.tumour]
        assert tumour[0].start <= first < tumour[0].stop
        assert tumour[-1].start <= last < tumour[-1].stop

    # Lesions ending just before sequence 1 and starting on sequence 1's last slice.
    b1_start, b1_stop = sequence_bounds(64, 8)[1]
    edges = tmp_path / "lesions.tsv"
    edges.write_text(
        f"patient_id\tz_start\tz_stop\nA\t{b1_start - 2}\t{b1_start}\n"
        f"B\t{b1_stop - 1}\t{b1_stop + 2}\n"
    )
    edge_ranges = read_lesion_table(edges)
    patient = _patients(cohort)[0]
    kinds = {}
    for name, z_range in edge_ranges.items():
        edged = type(patient)(patient.patient_id, patient.label, patient.ct_path, (), z_range)
        kinds[name] = [s.tumour for s in cut_patient_ct(edged, WHO_TYPES, SETTINGS)]
    assert kinds["A"] == [True, False, False, False]  # z_stop is not a lesion slice
    assert kinds["B"] == [False, True, True, False]  # z_start is one


def test_pairs_share_the_patient_and_test_samples_have_no_wsi(cohort):
    _, _, fold = cohort
    patients = {p.patient_id: p for p in _patients(cohort)}
    datasets = build_paired_datasets(list(patients.values()), fold, WHO_TYPES, SETTINGS, seed=3)
    train, test = datasets["train"], datasets["test"]
    assert {s.patient_id for s in train.samples} == set(fold["train"])
    assert {s.patient_id for s in test.samples} == set(fold["test"])
    numbers = {pid: n + 1 for n, pid in enumerate(sorted(patients))}
    labels = []
    for index in range(len(train)):
        item = train[index]
        patient = patients[item["patient_id"]]
        assert item["wsi"].shape == (3, 8, 32, 32)
        channel = torch.round(item["wsi"][0] * 255)
        assert torch.all(channel == 20 * numbers[item["patient_id"]])  # the same patient
        assert item["wsi_store"] in {str(path) for path in patient.patch_stores}
        type_index = WHO_TYPES.index(patient.label)
        assert int(item["label"]) == (type_index if item["tumour"] else K)
        labels.append(int(item["label"]))
    assert K in labels and len(set(labels)) > 2  # "other" kept in training
    for index in range(len(test)):
        item = test[index]
        assert "wsi" not in item and bool(item["tumour"])
        assert int(item["label"]) == WHO_TYPES.index(patients[item["patient_id"]].label)

    no_other = SequenceSettings(depth=8, size=32, keep_other=False, wsi_standardise=False)
    datasets = build_paired_datasets(list(patients.values()), fold, WHO_TYPES, no_other)
    assert all(s.tumour and s.class_index < K for s in datasets["train"].samples)


def test_intensity_statistics_come_from_training_patients_only(cohort):
    _, _, fold = cohort
    patients = _patients(cohort)
    datasets = build_paired_datasets(patients, fold, WHO_TYPES, SETTINGS)
    train_samples = [
        s
        for p in patients
        if p.patient_id in fold["train"]
        for s in cut_patient_ct(p, WHO_TYPES, SETTINGS)
    ]
    expected = Standardiser.fit(train_samples)
    assert datasets["test"].standardiser == datasets["train"].standardiser == expected
    everyone = Standardiser.fit(
        [s for p in patients for s in cut_patient_ct(p, WHO_TYPES, SETTINGS)]
    )
    assert everyone != expected
    item = datasets["test"][0]
    sample = datasets["test"].samples[0]
    assert torch.allclose(
        item["ct"][0], torch.from_numpy((sample.voxels - expected.mean) / expected.std)
    )
    # HU window: voxels lie in [0, 1] before standardisation, air at 0.
    volume = read_volume(patients[0].ct_path)
    assert volume.voxels.min() < -200 and sample.voxels.min() == 0.0 and sample.voxels.max() <= 1.0


def test_wsi_channel_statistics_come_from_training_patients_only(cohort):
    _, _, fold = cohort
    patients = _patients(cohort)
    numbers = {pid: n + 1 for n, pid in enumerate(sorted(p.patient_id for p in patients))}
    train_numbers = np.array([numbers[pid] for pid in fold["train"]], np.float64)
    # Two sequences per patient: slide 1's two blocks (ranks 0-15), never slide 2 (channel 1).
    expected_mean = (20 * train_numbers.mean() / 255, 50 / 255, 7.5 / 255)
    expected_std = (20 * train_numbers.std() / 255, 1e-6, np.arange(16).std() / 255)
    standardised = SequenceSettings(depth=8, size=32, wsi_fit_sequences=2)
    datasets = build_paired_datasets(
        patients, fold, WHO_TYPES, standardised, wsi_parts=("train", "test")
    )
    colours = datasets["train"].colours
    assert datasets["test"].colours == colours
    np.testing.assert_allclose(colours.mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(colours.std, expected_std, rtol=1e-5)
    item = datasets["test"][0]  # a test patient's slide, standardised by training statistics
    raw = 20 * numbers[item["patient_id"]] / 255
    expected = (raw - expected_mean[0]) / expected_std[0]
    assert torch.allclose(item["wsi"][0], torch.full((8, 32, 32), expected, dtype=torch.float32))
    # A third sequence per patient brings in slide 2; without WSI no statistic is fitted.
    three = SequenceSettings(depth=8, size=32, wsi_fit_sequences=3)
    mean = build_paired_datasets(patients, fold, WHO_TYPES, three)["train"].colours.mean
    assert mean[1] == pytest.approx((2 * 50 + 100) / 3 / 255)
    ct_only = build_paired_datasets(patients, fold, WHO_TYPES, standardised, wsi_parts=())
    assert ct_only["train"].colours is None and "wsi" not in ct_only["train"][0]


def test_pairing_is_deterministic_per_seed_and_epoch(cohort):
    _, _, fold = cohort
    patients = _patients(cohort)
    first = build_paired_datasets(patients, fold, WHO_TYPES, SETTINGS, seed=7)["train"]
    again = build_paired_datasets(patients, fold, WHO_TYPES, SETTINGS, seed=7)["train"]
    other_seed = build_paired_datasets(patients, fold, WHO_TYPES, SETTINGS, seed=8)["train"]
    epoch0 = list(first.pairing)
    assert again.pairing == epoch0 and other_seed.pairing != epoch0
    first.set_epoch(1)
    again.set_epoch(1)
    assert first.pairing == again.pairing != epoch0
    first.set_epoch(0)
    assert first.pairing == epoch0  # a resumed run pairs as before
    # Within a patient, every WSI sequence is used before one repeats.
    for pid in fold["train"]:
        picks = [w for s, w in zip(first.samples, epoch0, strict=True) if s.patient_id == pid]
        n_wsi = len(first.wsi[pid])
        assert len(set(picks[:n_wsi])) == min(len(picks), n_wsi)


def test_wsi_sequences_follow_reading_order(cohort):
    root, stores, _ = cohort
    pid = sorted(stores)[0]
    big = slide_wsi_sequences(stores[pid][0], pid, depth=8)
    small = slide_wsi_sequences(stores[pid][1], pid, depth=8)
    assert len(big) == 2 and len(small) == 1
    ranks = [np.round(read_wsi_sequence(s, 32)[2, :, 0, 0] * 255) for s in (*big, *small)]
    assert ranks[0].tolist() == list(range(8)) and ranks[1].tolist() == list(range(8, 16))
    assert ranks[2].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_collated_batch_feeds_the_teacher_loss(cohort):
    datasets = build_paired_datasets(_patients(cohort), cohort[2], WHO_TYPES, SETTINGS)
    loader = DataLoader(datasets["train"], batch_size=4, shuffle=False, collate_fn=collate_paired)
    batch = next(iter(loader))
    assert batch["ct"].shape == (4, 1, 8, 32, 32) and batch["ct"].dtype == torch.float32
    assert batch["wsi"].shape == (4, 3, 8, 32, 32)
    assert batch["label"].dtype == torch.int64 and batch["tumour"].dtype == torch.bool
    assert len(batch["patient_id"]) == 4 and len(batch["start"]) == 4
    torch.manual_seed(0)
    teacher = MHDTeacher(
        n_classes=K + 1, frames=8, widths=(8, 16, 32, 64), kernel_sizes=(3, 3, 3), gate_kernel=3
    )
    loss, logits, _ = teacher.loss(batch)
    loss.backward()
    assert logits.shape == (4, K + 1) and torch.isfinite(loss)
    test_batch = collate_paired([datasets["test"][i] for i in range(2)])
    assert "wsi" not in test_batch and test_batch["ct"].shape == (2, 1, 8, 32, 32)
