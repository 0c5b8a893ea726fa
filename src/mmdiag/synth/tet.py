"""A seeded synthetic thymic epithelial tumour (TET) cohort with planted, known signals.

MHD-Net (Zhang et al., "MHD-Net: Memory-Aware Hetero-Modal Distillation Network for Thymic
Epithelial Tumor Typing With Missing Pathology Modality") types TETs into the eight ordered
WHO types of :data:`WHO_TYPES` from CT sequences, with whole-slide images (WSI) available in
training only. This cohort plants a signal of known strength in each modality so that such a
method can be checked end to end:

- **CT** (weak, ``ct_signal_strength``): one NIfTI volume per patient from
  :func:`mmdiag.synth.volumes.render_ct_lesion` with the type as the ordinal grade and only
  the lesion enhancement carrying it, so the lesion's mean HU rises with the type under
  scanner noise, texture and a per-patient jitter. The lesion is a ball that covers a
  z-range of slices and leaves tumour-free ("other") slices on both sides of it.
- **WSI** (strong, ``wsi_signal_strength``): slides whose nuclear density and nucleus size
  rise with the type (:data:`NUCLEAR_DENSITY`, :data:`NUCLEUS_SIGMA_UM`), so the fraction of
  tissue covered by nuclei rises with it. This ordering is a synthetic convention, not the
  histology of the WHO types.

At strength 0 a modality carries no type information: its images are then drawn from the
same distribution for every type (and are identical for one patient whatever the type).

Layout written under ``root`` (the cohort-folder layout of :mod:`mmdiag.data.manifest`)::

    clinical.tsv        patient_id, disease, who_type
    images.tsv          patient_id, modality (CT|WSI), path (relative to root)
    ct/{pid}.nii.gz     int16 HU volume, slices along z (the last NIfTI axis)
    ct/{pid}_mask.nii.gz  uint8 lesion mask on the same grid (not listed in images.tsv)
    wsi/{pid}_s{n}.svs  Aperio-style pyramidal SVS, ``slides_per_patient`` per patient
    lesions.tsv         patient_id, z_start, z_stop: the lesion's slices, half-open
    cohort.json         provenance: version, settings, seed, planted signal, types

``disease`` is ``thymoma`` (types A to B3) or ``thymic_carcinoma`` (TC), the WHO's
division of TETs: the manifest requires a ``disease`` column with at least two classes;
the typing label is ``who_type``, declared as a task (:func:`manifest_rules`).

``z_start``/``z_stop`` index axis 0 of ``mmdiag.volumes.read_volume(path).voxels`` (the
volume is written with a diagonal, positive affine, so reading does not reorder slices):
slice ``k`` holds lesion voxels exactly when ``z_start <= k < z_stop``.

Every random draw comes from ``numpy.random.default_rng([seed, stream, index])``, so each
patient's images depend only on the seed, that patient and the signal settings, and the same
settings give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

import mmdiag
from mmdiag.data.manifest import ManifestRules
from mmdiag.data.tasks import Task
from mmdiag.io.atomic import atomic_path, write_json, write_tsv
from mmdiag.synth import volumes, wsi
from mmdiag.synth._draw import (
    balanced_labels,
    blend,
    impulse_blobs,
    smooth_noise,
    soft_step,
    stream_rng,
    to_uint8,
)

__all__ = [
    "DISEASES",
    "WHO_TYPES",
    "TetSettings",
    "manifest_rules",
    "plan_types",
    "render_patient_ct",
    "render_tet_slide",
    "write_tet_cohort",
]

log = logging.getLogger(__name__)

#: The WHO types of thymic epithelial tumours, in MHD-Net's (ordinal) class order.
WHO_TYPES = ("A", "AB", "B1", "B1+B2", "B2", "B2+B3", "B3", "TC")
#: ``disease`` column values: thymomas (A to B3) and thymic carcinoma (TC).
DISEASES = ("thymoma", "thymic_carcinoma")
#: Nuclei per area relative to one per (12 µm)², at the lowest and highest type (strength 1).
NUCLEAR_DENSITY = (0.4, 2.4)
#: Gaussian nucleus radius (µm), lowest and highest type at strength 1.
NUCLEUS_SIGMA_UM = (1.2, 2.0)
SIGNAL_DESCRIPTION = {
    "CT": "lesion enhancement (mean HU) rises linearly with the WHO type index",
    "WSI": "nuclear density and nucleus size rise linearly with the WHO type index",
}

_NUCLEUS_SPACING_UM = 12.0
_DRAW_SCALE = 2
_BACKGROUND_RGB = (246.0, 246.0, 244.0)
_STROMA_RGB, _LIGHT_STROMA_RGB, _NUCLEUS_RGB = (230, 150, 188), (246, 205, 224), (78, 42, 118)
# Random streams: one independent generator per (stream, patient).
_ASSIGNMENT, _CT, _WSI = range(3)


@dataclass(frozen=True)
class TetSettings:
    """What :func:`write_tet_cohort` writes; the defaults make a small demo cohort.

    Attributes
    ----------
    n_patients
        Patients, at least one per type; the types are assigned round-robin (balanced).
    seed
        Seed of every random draw.
    ct_signal_strength, wsi_signal_strength
        How much of the type reaches each modality, in ``[0, 1]``
        (:func:`mmdiag.synth.volumes.ordinal_level`); 0 removes it.
    ct_shape_vox, ct_spacing_mm
        CT grid ``(x, y, z)`` in voxels and voxel size in mm.
    slides_per_patient, slide_px, mpp
        WSIs per patient, their (square) level-0 size and micrometres per pixel.
    """

    n_patients: int = 48
    seed: int = 0
    ct_signal_strength: float = 0.3
    wsi_signal_strength: float = 1.0
    ct_shape_vox: tuple[int, int, int] = (64, 64, 40)
    ct_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 0.8)
    slides_per_patient: int = 2
    slide_px: int = 1024
    mpp: float = 0.5
    objective_power: float = 20.0
    n_levels: int = 3
    downsample: int = 4
    tile_px: int = 256
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        """Reject settings that cannot give a valid cohort, naming the setting."""
        if self.n_patients < len(WHO_TYPES):
            raise ValueError(f"n_patients must be >= {len(WHO_TYPES)}, got {self.n_patients}")
        for name in ("ct_signal_strength", "wsi_signal_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.slides_per_patient < 1:
            raise ValueError(f"slides_per_patient must be >= 1, got {self.slides_per_patient}")
        if self.slide_px < 64 or self.mpp <= 0:
            raise ValueError(f"need slide_px >= 64 and mpp > 0, got {self.slide_px}, {self.mpp}")


def plan_types(settings: TetSettings) -> list[str]:
    """WHO type of each patient: round-robin over :data:`WHO_TYPES`, shuffled by the seed.

    Counts per type differ by at most one; the shuffle keeps the patient order from
    revealing the type.
    """
    return balanced_labels(WHO_TYPES, settings.n_patients, stream_rng(settings.seed, _ASSIGNMENT))


def disease_of(who_type: str) -> str:
    """``thymic_carcinoma`` for type TC, ``thymoma`` for every other type."""
    return DISEASES[1] if who_type == "TC" else DISEASES[0]


def manifest_rules(min_slide_px: int = 256) -> ManifestRules:
    """Manifest rules this cohort satisfies: CT and WSI required, ``who_type`` an ordinal task.

    The config equivalent is ``classes: [thymoma, thymic_carcinoma]``,
    ``required_modalities: [CT, WSI]`` and ``tasks: {who_type: {classes: [A, ..., TC],
    ordinal: true, required: true}}``.
    """
    return ManifestRules(
        classes=DISEASES,
        required_modalities=("CT", "WSI"),
        min_image_px={"CT": 16, "WSI": min_slide_px},
        tasks=(Task("who_type", "who_type", WHO_TYPES, ordinal=True, required=True),),
    )


def render_patient_ct(
    settings: TetSettings, index: int, who_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """CT volume (int16 HU, ``[x, y, z]``) and lesion mask of patient ``index``.

    Only the lesion enhancement carries the type, so the lesion's HU offset rises with it
    (:data:`mmdiag.synth.volumes.GRADE_ENHANCEMENT_HU`, scaled by ``ct_signal_strength``).
    """
    volume, mask, _ = volumes.render_ct_lesion(
        stream_rng(settings.seed, _CT, index),
        settings.ct_shape_vox,
        settings.ct_spacing_mm,
        grade=WHO_TYPES.index(who_type),
        n_grades=len(WHO_TYPES),
        signal_strength=settings.ct_signal_strength,
        signal=("enhancement",),
    )
    return volume, mask


def render_tet_slide(
    rng: np.random.Generator, size_px: int, *, mpp: float, level: float
) -> np.ndarray:
    """Render one square H&E-like slide, uint8 ``(size_px, size_px, 3)``.

    One tissue fragment with a rough rim (pink stroma with fibre texture) on white glass,
    holding dark-purple nuclei whose density and size grow with ``level`` in ``[0, 1]``
    (:data:`NUCLEAR_DENSITY`, :data:`NUCLEUS_SIGMA_UM`). The number of random draws of the
    tissue does not depend on ``level``.

    The slide is drawn at ``_DRAW_SCALE`` times the pixel size and enlarged bilinearly,
    which is that factor squared faster; the blur it adds is smaller than a nucleus.
    """
    draw_px = max(size_px // _DRAW_SCALE, 32)
    small = _draw_slide(rng, draw_px, mpp=mpp * size_px / draw_px, level=level)
    return np.asarray(Image.fromarray(small).resize((size_px, size_px), Image.BILINEAR))


def _draw_slide(rng: np.random.Generator, size_px: int, *, mpp: float, level: float):
    """The slide of :func:`render_tet_slide` drawn at ``size_px`` and ``mpp``."""
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32) / np.float32(size_px)
    centre = rng.uniform(0.44, 0.56, 2)
    semi = rng.uniform(0.3, 0.38, 2)
    radius = np.sqrt(((xx - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2)
    rim = 1.0 - radius + 0.12 * smooth_noise(rng, size_px, size_px, size_px / 8)
    tissue = soft_step(-rim, 0.01)

    stroma = np.empty((size_px, size_px, 3), np.float32)
    stroma[:] = _STROMA_RGB
    fibres = smooth_noise(rng, size_px, size_px, max(6.0 / mpp, 2.0))
    blend(stroma, _LIGHT_STROMA_RGB, soft_step(-fibres, 0.3) * 0.8)

    density = volumes.lerp(NUCLEAR_DENSITY, level)
    spacing_px = _NUCLEUS_SPACING_UM / mpp / np.sqrt(density)
    n_nuclei = int(size_px**2 / spacing_px**2)
    ys, xs = rng.uniform(0, size_px - 1, (2, n_nuclei))
    inside = tissue[ys.astype(np.int64), xs.astype(np.int64)] > 0.5
    sigma_px = max(volumes.lerp(NUCLEUS_SIGMA_UM, level) / mpp, 0.7)
    weights = rng.uniform(0.8, 1.4, n_nuclei)[inside]
    nuclei = impulse_blobs((size_px, size_px), ys[inside], xs[inside], sigma_px, weights)
    blend(stroma, _NUCLEUS_RGB, np.clip(1.7 * nuclei, 0.0, 0.95))

    image = np.empty_like(stroma)
    image[:] = _BACKGROUND_RGB
    blend(image, 0.0, tissue)
    image += stroma * tissue[..., None]
    image += rng.normal(0.0, 2.0, (size_px, size_px, 1)).astype(np.float32)
    return to_uint8(image)


def _write_ct(folder: Path, settings: TetSettings, index: int, pid: str, who_type: str) -> dict:
    """Write patient ``index``'s CT and mask; return its ``lesions.tsv`` row."""
    volume, mask = render_patient_ct(settings, index, who_type)
    case = volumes.write_ct_case(folder / "ct", pid, volume, mask, settings.ct_spacing_mm)
    first, last = int(case["lesion_z_first"]), int(case["lesion_z_last"])
    if first == 0 or last == settings.ct_shape_vox[2] - 1:
        raise ValueError(
            f"{pid}: the lesion reaches the first or last slice; use more slices or a larger "
            f"z spacing than ct_shape_vox={settings.ct_shape_vox}, "
            f"ct_spacing_mm={settings.ct_spacing_mm}"
        )
    return {"patient_id": pid, "z_start": first, "z_stop": last + 1}


def _write_slides(
    folder: Path, settings: TetSettings, index: int, pid: str, who_type: str
) -> list[str]:
    """Write patient ``index``'s slides; return their paths relative to the cohort folder."""
    level = volumes.ordinal_level(
        WHO_TYPES.index(who_type), len(WHO_TYPES), settings.wsi_signal_strength
    )
    rng = stream_rng(settings.seed, _WSI, index)
    section_seeds = rng.integers(0, 2**63 - 1, size=settings.slides_per_patient, dtype=np.int64)
    relatives = []
    for number, section_seed in enumerate(section_seeds, start=1):
        pixels = render_tet_slide(
            np.random.default_rng(int(section_seed)),
            settings.slide_px,
            mpp=settings.mpp,
            level=level,
        )
        relative = f"wsi/{pid}_s{number}.svs"
        wsi.write_svs(
            folder / relative,
            pixels,
            mpp=settings.mpp,
            objective_power=settings.objective_power,
            n_levels=settings.n_levels,
            downsample=settings.downsample,
            tile_px=settings.tile_px,
            jpeg_quality=settings.jpeg_quality,
        )
        relatives.append(relative)
    return relatives


def _patient_ids(n_patients: int) -> list[str]:
    width = max(3, len(str(n_patients)))
    return [f"TET{i + 1:0{width}d}" for i in range(n_patients)]


def write_tet_cohort(root: str | Path, settings: TetSettings | None = None) -> Path:
    """Write the synthetic TET cohort folder at ``root`` and return ``root``.

    Parameters
    ----------
    root : path
        Cohort folder to create; an existing folder is replaced only once the new one is
        complete.
    settings : TetSettings, optional
        Cohort size, seed, signal strengths and image geometry (default: the demo settings).

    Returns
    -------
    Path
        ``root``, laid out as the module docstring describes.

    Notes
    -----
    Side effects: builds the cohort in a temporary folder beside ``root`` and renames it into
    place (:func:`mmdiag.io.atomic.atomic_path`), so a failure leaves no half-written cohort.
    The same settings give byte-identical files.
    """
    settings = settings or TetSettings()
    root, started = Path(root), time.perf_counter()
    types, pids = plan_types(settings), _patient_ids(settings.n_patients)
    images, lesions = [], []
    with atomic_path(root, is_dir=True) as folder:
        (folder / "ct").mkdir()
        (folder / "wsi").mkdir()
        for index, (pid, who_type) in enumerate(zip(pids, types, strict=True)):
            lesions.append(_write_ct(folder, settings, index, pid, who_type))
            images.append({"patient_id": pid, "modality": "CT", "path": f"ct/{pid}.nii.gz"})
            for relative in _write_slides(folder, settings, index, pid, who_type):
                images.append({"patient_id": pid, "modality": "WSI", "path": relative})
        clinical = pd.DataFrame(
            {"patient_id": pids, "disease": [disease_of(t) for t in types], "who_type": types}
        )
        write_tsv(clinical, folder / "clinical.tsv")
        write_tsv(pd.DataFrame(images), folder / "images.tsv")
        write_tsv(pd.DataFrame(lesions), folder / "lesions.tsv")
        write_json(_provenance(settings, pids, types), folder / "cohort.json")
    log.info(
        "wrote TET cohort %s: %d patients, %d images in %.1f s",
        root,
        len(pids),
        len(images),
        time.perf_counter() - started,
    )
    return root


def _provenance(settings: TetSettings, pids: list[str], types: list[str]) -> dict[str, Any]:
    return {
        "mmdiag_version": mmdiag.__version__,
        "generator": "mmdiag.synth.tet.write_tet_cohort",
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "who_types": list(WHO_TYPES),
        "planted_signal": SIGNAL_DESCRIPTION,
        "patients": [{"patient_id": p, "who_type": t} for p, t in zip(pids, types, strict=True)],
    }
