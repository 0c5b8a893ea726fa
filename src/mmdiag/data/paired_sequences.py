"""CT sequences paired with WSI patch sequences of the same patient, as MHD-Net trains on them.

MHD-Net (Zhang et al., IEEE JBHI 2024, Section IV-A) cuts every CT into 24-slice sequences after
dropping the first 20 % and last 30 % of the slices, labels the sequences that cover the tumour
with the patient's type and the others "other" (a ninth class, used in training only), and
divides every WSI, without its cell-sparse and white regions, into uniform sequences of 24
patches. The teacher reads one CT sequence with one WSI sequence; the student and every test
sample read CT alone.

Choices made here, each configurable through :class:`SequenceSettings`:

- **CT cutting**: :func:`mmdiag.volumes.cut_sequences` with the patient's lesion range, read
  from a lesion table (``patient_id, z_start, z_stop``, half-open on axis 0 of
  :func:`~mmdiag.volumes.read_volume`'s voxels; :func:`read_lesion_table` turns it into
  ``cut_sequences``' inclusive ``(first, last)``) or from a lesion mask volume.
- **CT intensities**: a fixed HU window (level 50, width 500: fat to the most enhanced lesion,
  the paper gives none), then standardisation by a mean and standard deviation fitted on the
  training patients' sequences only (:class:`Standardiser`), so no statistic sees a test
  patient.
- **Labels**: class ``classes.index(type)`` for a tumour sequence, ``len(classes)`` (``K``) for
  an "other" one; "other" sequences are kept in training when ``keep_other`` is set and never
  in validation or test (the paper reports the 8 types only).
- **WSI sequences**: each slide's non-background patches (the patch store's grid) in reading
  order (row-major by centre, as :func:`~mmdiag.patching.tiling.ordered_sequence`), divided
  into consecutive blocks of ``depth`` patches, a last partial block dropped; a slide with
  fewer than ``depth`` patches gives one sequence of all of them with the last repeated
  (:func:`~mmdiag.patching.tiling.ordered_sequence`). This follows "divide each WSI into
  uniform WSI sequences" (neighbouring patches stay together, every patch is used once);
  :func:`~mmdiag.patching.tiling.sample_fixed` would mix patches from all over the slide.
  Patches are resized to the CT's in-plane size and scaled to ``[0, 1]``.
- **WSI intensities** (the paper gives none): with ``wsi_standardise`` (default), each colour
  channel is standardised by a mean and standard deviation fitted on the training patients'
  patches only (:class:`ChannelStandardiser`: up to ``wsi_fit_sequences`` sequences per
  training patient, the first in reading order), as the CT is. Unstandardised, H&E patches on
  ``[0, 1]`` differ between types by a few hundredths of a channel's range while their mean
  (about 0.7) dominates the first convolution, and the pathology branch learns the type far
  less reliably on the planted-signal cohort (:mod:`mmdiag.synth.tet`).
- **Pairing**: every CT sequence with a WSI sequence of *the same patient* (the authors' code
  pairs a random case of the same class instead), drawn from
  ``numpy.random.default_rng([seed, epoch, crc32(patient_id)])``: a per-patient permutation of
  its WSI sequences, the ``k``-th CT sequence (by start) taking entry ``k`` modulo their number.
  The pairing depends only on (seed, epoch, patient), so a resumed run pairs as before and
  each epoch pairs anew.
- **Splits**: by patient, through :func:`mmdiag.data.units.split_units` on one unit per CT
  sequence (``<patient_id>@<start>-<stop>``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mmdiag.data.units import split_units
from mmdiag.io.tables import read_tsv
from mmdiag.patching.dataset import StoreHandles
from mmdiag.patching.store import PatchStore, open_patch_store
from mmdiag.patching.tiling import ordered_sequence
from mmdiag.volumes import TUMOUR, cut_sequences, hu_window, read_volume, resize_array

__all__ = [
    "ChannelStandardiser",
    "CtSample",
    "PairedSequenceDataset",
    "PatientImages",
    "SequenceSettings",
    "Standardiser",
    "WsiSequence",
    "build_paired_datasets",
    "collate_paired",
    "cut_patient_ct",
    "pair_sequences",
    "patient_wsi_sequences",
    "read_cohort_patients",
    "read_lesion_table",
    "read_wsi_sequence",
    "slide_wsi_sequences",
]

#: Parts of a fold, in order.
PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SequenceSettings:
    """How CT and WSI sequences are cut and which are kept (defaults: the paper's numbers).

    Attributes
    ----------
    depth, size
        Slices (and patches) per sequence and in-plane size in pixels (paper 24 and 224).
    head_fraction, tail_fraction
        Fractions of the CT slices dropped at the start and end of axis 0 (paper 0.2, 0.3).
    min_lesion_fraction
        Passed to :func:`~mmdiag.volumes.cut_sequences` (0: one lesion slice makes a tumour
        sequence).
    hu_level, hu_width
        CT window in Hounsfield units, mapped onto ``[0, 1]`` before standardisation.
    patch_scale
        Patch-store scale read for WSI patches (``"20x"``...); ``None``: the finest with pixels.
    keep_other
        Keep "other" (tumour-free) CT sequences in training, with class index ``K``.
    wsi_standardise, wsi_fit_sequences
        Standardise WSI channels with statistics of the training patients' patches, read from
        at most ``wsi_fit_sequences`` sequences per training patient.
    """

    depth: int = 24
    size: int = 224
    head_fraction: float = 0.2
    tail_fraction: float = 0.3
    min_lesion_fraction: float = 0.0
    hu_level: float = 50.0
    hu_width: float = 500.0
    patch_scale: str | None = None
    keep_other: bool = True
    wsi_standardise: bool = True
    wsi_fit_sequences: int = 2

    def __post_init__(self) -> None:
        """Reject sizes no sequence can have, naming the setting."""
        for name in ("depth", "size"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.hu_width > 0:
            raise ValueError(f"hu_width must be positive, got {self.hu_width!r}")
        if int(self.wsi_fit_sequences) != self.wsi_fit_sequences or self.wsi_fit_sequences < 1:
            raise ValueError(
                f"wsi_fit_sequences must be a positive integer, got {self.wsi_fit_sequences!r}"
            )


@dataclass(frozen=True)
class PatientImages:
    """One patient's inputs: type label, CT volume, lesion location and slide patch stores.

    ``lesion_z_range`` is inclusive ``(first, last)`` on axis 0 of the read volume (as
    :func:`~mmdiag.volumes.cut_sequences` takes it); give it or ``lesion_mask_path``.
    """

    patient_id: str
    label: str
    ct_path: Path
    patch_stores: tuple[Path, ...] = ()
    lesion_z_range: tuple[int, int] | None = None
    lesion_mask_path: Path | None = None


@dataclass(frozen=True, eq=False)
class CtSample:
    """One CT sequence: windowed ``(depth, size, size)`` voxels, class index, tumour flag."""

    patient_id: str
    start: int
    stop: int
    voxels: np.ndarray
    class_index: int
    tumour: bool

    @property
    def unit_id(self) -> str:
        return f"{self.patient_id}@{self.start}-{self.stop}"


@dataclass(frozen=True, eq=False)
class WsiSequence:
    """``len(rows)`` patches of one slide's patch store (rows of its grid, in sequence order)."""

    patient_id: str
    store: Path
    scale: str
    rows: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Standardiser:
    """``(x - mean) / std`` with statistics fitted on training sequences only."""

    mean: float
    std: float

    @classmethod
    def fit(cls, samples: Sequence[CtSample], eps: float = 1e-6) -> Standardiser:
        """Mean and standard deviation over every voxel of ``samples`` (training patients')."""
        if not samples:
            raise ValueError("cannot fit intensity statistics on no training sequence")
        values = np.stack([sample.voxels for sample in samples])
        mean = float(np.mean(values, dtype=np.float64))
        return cls(mean=mean, std=max(float(np.std(values, dtype=np.float64)), eps))

    def __call__(self, voxels: np.ndarray) -> np.ndarray:
        return ((voxels - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True)
class ChannelStandardiser:
    """``(x - mean[c]) / std[c]`` per colour channel ``c`` of a ``(3, T, H, W)`` WSI sequence,
    with statistics fitted on training patients' patches only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(
        cls,
        sequences: Mapping[str, Sequence[WsiSequence]],
        size: int,
        *,
        per_patient: int = 2,
        eps: float = 1e-6,
    ) -> ChannelStandardiser:
        """Channel means and standard deviations over the first ``per_patient`` sequences of
        every patient of ``sequences`` (the training patients'), read at ``size``."""
        chosen = [s for pid in sorted(sequences) for s in sequences[pid][:per_patient]]
        if not chosen:
            raise ValueError("cannot fit WSI channel statistics on no training sequence")
        total = np.zeros(3, np.float64)
        squares = np.zeros(3, np.float64)
        count = 0
        for sequence in chosen:
            flat = read_wsi_sequence(sequence, size).reshape(3, -1).astype(np.float64)
            total += flat.sum(axis=1)
            squares += (flat**2).sum(axis=1)
            count += flat.shape[1]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return cls(mean=tuple(mean.tolist()), std=tuple(np.maximum(std, eps).tolist()))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(3, 1, 1, 1)
        return ((pixels - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------- reading inputs


def read_lesion_table(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Inclusive ``(first, last)`` lesion slices per patient from a half-open lesion table.

    The table has ``patient_id, z_start, z_stop`` with slice ``k`` holding lesion exactly when
    ``z_start <= k < z_stop``; the result is ``(z_start, z_stop - 1)``, the inclusive range
    :func:`~mmdiag.volumes.cut_sequences` takes as ``lesion_z_range``.
    """
    table = read_tsv(path)
    missing = {"patient_id", "z_start", "z_stop"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: lesion table lacks columns {sorted(missing)}")
    if table["patient_id"].duplicated().any():
        raise ValueError(f"{path}: a patient has two lesion rows")
    ranges = {}
    for pid, start, stop in table[["patient_id", "z_start", "z_stop"]].itertuples(index=False):
        if not 0 <= int(start) < int(stop):
            raise ValueError(f"{path}: patient {pid}: empty or negative range [{start}, {stop})")
        ranges[str(pid)] = (int(start), int(stop) - 1)
    return ranges


def read_cohort_patients(
    root: str | os.PathLike,
    patch_stores: Mapping[str, Sequence[str | os.PathLike]],
    *,
    label_column: str = "who_type",
    lesions: str = "table",
) -> list[PatientImages]:
    """The patients of a cohort folder (``clinical.tsv``, ``images.tsv``), sorted by id.

    ``patch_stores`` maps a patient to its slides' patch stores. ``lesions="table"`` reads
    ``root/lesions.tsv`` (:func:`read_lesion_table`); ``"mask"`` uses the mask volume beside
    each CT, ``<ct stem>_mask.nii.gz``.
    """
    if lesions not in ("table", "mask"):
        raise ValueError(f"lesions must be 'table' or 'mask', got {lesions!r}")
    root = Path(root)
    clinical = read_tsv(root / "clinical.tsv").set_index("patient_id")
    images = read_tsv(root / "images.tsv")
    ct = images[images["modality"].str.upper() == "CT"].drop_duplicates("patient_id", keep=False)
    ct_paths = {str(p): root / path for p, path in zip(ct["patient_id"], ct["path"], strict=True)}
    ranges = read_lesion_table(root / "lesions.tsv") if lesions == "table" else {}
    patients = []
    for pid in sorted(clinical.index.astype(str)):
        if pid not in ct_paths:
            raise ValueError(f"{root}: patient {pid} has no single CT volume in images.tsv")
        patients.append(
            PatientImages(
                patient_id=pid,
                label=str(clinical.loc[pid, label_column]),
                ct_path=ct_paths[pid],
                patch_stores=tuple(Path(p) for p in patch_stores.get(pid, ())),
                lesion_z_range=ranges.get(pid) if lesions == "table" else None,
                lesion_mask_path=lesion_mask_path_of(ct_paths[pid]) if lesions == "mask" else None,
            )
        )
    return patients


def lesion_mask_path_of(ct_path: Path) -> Path:
    """``ct/P1.nii.gz`` -> ``ct/P1_mask.nii.gz``."""
    stem = ct_path.name.removesuffix(".gz").removesuffix(".nii")
    return ct_path.with_name(f"{stem}_mask.nii.gz")


# --------------------------------------------------------------------------- CT side


def cut_patient_ct(
    patient: PatientImages, classes: Sequence[str], settings: SequenceSettings
) -> list[CtSample]:
    """Every CT sequence of ``patient``, HU-windowed, labelled by type or as "other" (``K``)."""
    if patient.label not in classes:
        raise ValueError(f"patient {patient.patient_id}: type {patient.label!r} not in {classes}")
    volume = read_volume(patient.ct_path)
    mask = None
    if patient.lesion_mask_path is not None:
        mask = read_volume(patient.lesion_mask_path).voxels > 0.5
    elif patient.lesion_z_range is None:
        raise ValueError(f"patient {patient.patient_id}: no lesion range or mask")
    sequences = cut_sequences(
        hu_window(volume, settings.hu_level, settings.hu_width),
        depth=settings.depth,
        size=settings.size,
        head_fraction=settings.head_fraction,
        tail_fraction=settings.tail_fraction,
        lesion_mask=mask,
        lesion_z_range=patient.lesion_z_range,
        min_lesion_fraction=settings.min_lesion_fraction,
    )
    type_index = list(classes).index(patient.label)
    return [
        CtSample(
            patient_id=patient.patient_id,
            start=s.start,
            stop=s.stop,
            voxels=s.voxels,
            class_index=type_index if s.label == TUMOUR else len(classes),
            tumour=s.label == TUMOUR,
        )
        for s in sequences
    ]


# --------------------------------------------------------------------------- WSI side


def slide_wsi_sequences(
    store_path: str | os.PathLike, patient_id: str, *, depth: int = 24, scale: str | None = None
) -> list[WsiSequence]:
    """One slide's patches in reading order cut into consecutive blocks of ``depth``.

    A last partial block is dropped; a slide with fewer than ``depth`` patches gives one
    sequence with its last patch repeated (:func:`~mmdiag.patching.tiling.ordered_sequence`).
    """
    store = open_patch_store(store_path)
    scale = scale or (store.pixel_scales or [None])[0]
    if scale not in store.pixel_scales:
        raise ValueError(f"patch store {store.path} has no pixels at scale {scale!r}")
    grid = store.grid.assign(row=np.arange(len(store.grid)))
    if len(grid) < depth:
        blocks = [ordered_sequence(grid, depth)["row"].to_numpy()]
    else:
        order = grid.sort_values(["centre_y", "centre_x"], kind="stable")["row"].to_numpy()
        blocks = [order[i : i + depth] for i in range(0, len(order) - depth + 1, depth)]
    return [WsiSequence(patient_id, store.path, scale, rows) for rows in blocks]


def patient_wsi_sequences(patient: PatientImages, settings: SequenceSettings) -> list[WsiSequence]:
    """The WSI sequences of all of ``patient``'s slides, slide by slide."""
    if not patient.patch_stores:
        raise ValueError(f"patient {patient.patient_id}: no patch store to pair CT with")
    return [
        sequence
        for store in patient.patch_stores
        for sequence in slide_wsi_sequences(
            store, patient.patient_id, depth=settings.depth, scale=settings.patch_scale
        )
    ]


def read_wsi_sequence(
    sequence: WsiSequence, size: int, store: PatchStore | None = None
) -> np.ndarray:
    """``(3, depth, size, size)`` float32 in ``[0, 1]``: the sequence's patches, resized.

    ``store`` is the sequence's opened patch store (opened here when not given).
    """
    store = store or open_patch_store(sequence.store)
    pixels = store.pixels(sequence.scale, sequence.rows)
    if pixels.shape[1:3] != (size, size):
        pixels = resize_array(pixels, (len(pixels), size, size, 3))
    return np.ascontiguousarray(np.moveaxis(pixels.astype(np.float32) / 255.0, -1, 0))


# --------------------------------------------------------------------------- pairing


def pair_sequences(
    ct_samples: Sequence[CtSample], wsi_counts: Mapping[str, int], *, seed: int, epoch: int
) -> list[int]:
    """For every CT sample, the index of its WSI sequence among its own patient's.

    A per-patient permutation from ``default_rng([seed, epoch, crc32(patient_id)])``; the
    ``k``-th sample of a patient (in the order given) takes entry ``k mod n``, so all of a
    patient's WSI sequences are used before one repeats.
    """
    seen: dict[str, int] = {}
    orders: dict[str, np.ndarray] = {}
    pairing = []
    for sample in ct_samples:
        pid = sample.patient_id
        if wsi_counts.get(pid, 0) < 1:
            raise ValueError(f"patient {pid} has CT sequences but no WSI sequence")
        if pid not in orders:
            rng = np.random.default_rng([int(seed), int(epoch), zlib.crc32(pid.encode())])
            orders[pid] = rng.permutation(wsi_counts[pid])
        k = seen.get(pid, 0)
        seen[pid] = k + 1
        pairing.append(int(orders[pid][k % len(orders[pid])]))
    return pairing


# --------------------------------------------------------------------------- dataset


class PairedSequenceDataset(Dataset):
    """CT sequences, each with a same-patient WSI sequence when ``wsi`` is given.

    ``set_epoch`` re-pairs deterministically (:func:`pair_sequences`). Items are dicts of
    ``ct`` ``(1, T, H, W)``, ``wsi`` ``(3, T, H, W)`` (only with WSI), ``label``, ``tumour``,
    ``patient_id``, ``start`` (and ``wsi_store``, ``wsi_rows`` for tracing). ``colours``, when
    given, standardises the WSI channels (fitted on the training patients).
    """

    def __init__(
        self,
        samples: Sequence[CtSample],
        standardiser: Standardiser,
        *,
        wsi: Mapping[str, Sequence[WsiSequence]] | None = None,
        colours: ChannelStandardiser | None = None,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.standardiser, self.colours, self.seed = standardiser, colours, int(seed)
        self.wsi = None if wsi is None else {pid: list(seqs) for pid, seqs in wsi.items()}
        if self.wsi is not None:
            stores = sorted({str(s.store) for seqs in self.wsi.values() for s in seqs})
            self._store_index = {path: i for i, path in enumerate(stores)}
            self._handles = StoreHandles(stores)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Pair every CT sequence for ``epoch`` (no-op without WSI)."""
        self.epoch = int(epoch)
        if self.wsi is None:
            self.pairing = None
            return
        counts = {pid: len(seqs) for pid, seqs in self.wsi.items()}
        self.pairing = pair_sequences(self.samples, counts, seed=self.seed, epoch=self.epoch)

    def paired_wsi(self, index: int) -> WsiSequence | None:
        """The WSI sequence paired with sample ``index`` this epoch (``None`` without WSI)."""
        if self.pairing is None:
            return None
        return self.wsi[self.samples[index].patient_id][self.pairing[index]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item = {
            "ct": torch.from_numpy(self.standardiser(sample.voxels)[None]),
            "label": torch.tensor(sample.class_index, dtype=torch.int64),
            "tumour": torch.tensor(sample.tumour),
            "patient_id": sample.patient_id,
            "start": sample.start,
        }
        sequence = self.paired_wsi(index)
        if sequence is not None:
            store = self._handles[self._store_index[str(sequence.store)]]
            size = sample.voxels.shape[-1]
            pixels = read_wsi_sequence(sequence, size, store)
            item["wsi"] = torch.from_numpy(self.colours(pixels) if self.colours else pixels)
            item["wsi_store"], item["wsi_rows"] = str(sequence.store), sequence.rows.tolist()
        return item


def collate_paired(items: Sequence[dict]) -> dict:
    """Stack items into the batch MHD-Net reads: tensors stacked, ids and traces as lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def build_paired_datasets(
    patients: Sequence[PatientImages],
    fold: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    settings: SequenceSettings | None = None,
    *,
    seed: int = 0,
    wsi_parts: Sequence[str] = ("train",),
) -> dict[str, PairedSequenceDataset]:
    """Train, val and test datasets of a patient-level ``fold``.

    Intensity statistics (CT, and the WSI channels with ``settings.wsi_standardise``) are
    fitted on the training part only. "Other" sequences stay in
    ``train`` when ``settings.keep_other`` and are dropped elsewhere. Parts in ``wsi_parts``
    (default training only) carry paired WSI; the others are CT only, as at test time.
    """
    settings = settings or SequenceSettings()
    unknown = set(wsi_parts) - set(PARTS)
    if unknown:
        raise ValueError(f"wsi_parts must be among {PARTS}, got {sorted(unknown)}")
    in_fold = {str(p) for part in PARTS for p in fold.get(part, [])}
    chosen = [patient for patient in patients if patient.patient_id in in_fold]
    samples = [s for patient in chosen for s in cut_patient_ct(patient, classes, settings)]
    parts = _split_samples(samples, fold)
    parts = {
        part: [s for s in found if s.tumour or (part == "train" and settings.keep_other)]
        for part, found in parts.items()
    }
    standardiser = Standardiser.fit(parts["train"])
    by_id = {patient.patient_id: patient for patient in chosen}
    wsi = {
        part: {pid: patient_wsi_sequences(by_id[pid], settings) for pid in _patients_of(found)}
        for part, found in parts.items()
        if part in wsi_parts
    }
    colours = None
    if settings.wsi_standardise and wsi:
        train_patients = {pid: by_id[pid] for pid in _patients_of(parts["train"])}
        train_wsi = wsi.get("train") or {
            pid: patient_wsi_sequences(p, settings) for pid, p in train_patients.items()
        }
        colours = ChannelStandardiser.fit(
            train_wsi, settings.size, per_patient=settings.wsi_fit_sequences
        )
    return {
        part: PairedSequenceDataset(
            found, standardiser, wsi=wsi.get(part), colours=colours, seed=seed
        )
        for part, found in parts.items()
    }


def _patients_of(samples: Sequence[CtSample]) -> list[str]:
    return sorted({s.patient_id for s in samples})


def _split_samples(
    samples: Sequence[CtSample], fold: Mapping[str, Sequence[str]]
) -> dict[str, list[CtSample]]:
    """Samples of each part by patient, via :func:`~mmdiag.data.units.split_units`."""
    by_unit = {sample.unit_id: sample for sample in samples}
    units = pd.DataFrame(
        {"unit_id": list(by_unit), "patient_id": [s.patient_id for s in by_unit.values()]}
    )
    parts = split_units(units, fold)
    return {
        part: sorted((by_unit[u] for u in frame["unit_id"]), key=lambda s: (s.patient_id, s.start))
        for part, frame in parts.items()
    }
