"""A seeded synthetic RadPath-like glioma cohort: paired brain MR and H&E slides.

DeepGuide (Mallya and Hamarneh, "Deep Multimodal Guidance for Medical Image
Classification") trains a classifier on an inferior modality (multi-sequence brain MR)
guided by the latent representation of a superior one (H&E whole-slide images), on the
RadPath 2020 challenge data: per patient T1, T1ce, T2 and FLAIR volumes and one slide, and
one of the three glioma classes of :data:`CLASSES`. This cohort plants a signal of known
reliability in each modality so that such a method can be checked end to end:

- **WSI** (superior, ``wsi_reliability``): each class has its own nuclear appearance
  (:data:`WSI_PATTERNS`: nuclear density, nucleus size and a perinuclear halo), so the
  fraction of tissue covered by nuclei differs clearly between the classes. A slide shows
  its patient's class pattern with probability ``wsi_reliability``, else the pattern of one
  of the two other classes, drawn at random; per-slide stain and density jitter is the
  nuisance.
- **MR** (inferior, ``mr_signal_strength`` and ``mr_reliability``): four co-registered
  sequences from :func:`mmdiag.synth.mr.render_mr` whose lesion enhancement (T1ce) and
  radius rise with the ordinal grade :data:`MR_GRADE` of the class pattern the MR shows,
  scaled by ``mr_signal_strength``; the MR shows the patient's class pattern with
  probability ``mr_reliability``, else another class's, drawn at random independently of
  the slide's. Nuisance: render_mr's coil bias field and noise, plus a per-patient global
  intensity scale (:data:`MR_SCALE_RANGE`) and a per-sequence gain jitter
  (:data:`MR_SEQUENCE_GAIN_RANGE`).

The grade order and the nuclear patterns are synthetic conventions, not the radiology or
histology of the classes. A reliability of ``1/3`` (one over the number of classes) makes
the shown pattern independent of the class; ``mr_signal_strength=0`` gives MR volumes that
are identical for one patient whatever pattern it shows.

Layout written under ``root`` (the cohort-folder layout of :mod:`mmdiag.data.manifest`)::

    clinical.tsv              patient_id, disease (one of CLASSES)
    images.tsv                patient_id, modality (MR|WSI), path (relative to root)
    mr/{pid}_t1.nii.gz        int16 volumes on one grid, BraTS-style sequence suffixes:
    mr/{pid}_t1ce.nii.gz        _t1, _t1ce, _t2, _flair (all four listed as modality MR)
    mr/{pid}_t2.nii.gz
    mr/{pid}_flair.nii.gz
    mr/{pid}_mask.nii.gz      uint8 lesion mask on the same grid (not listed in images.tsv)
    wsi/{pid}.svs             Aperio-style pyramidal SVS, one per patient
    cohort.json               provenance: version, settings, seed, planted signal, and per
                              patient the class pattern each modality shows

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
from mmdiag.io.atomic import atomic_path, write_json, write_tsv
from mmdiag.synth import mr, wsi
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
    "CLASSES",
    "MR_GRADE",
    "WSI_PATTERNS",
    "RadPathSettings",
    "manifest_rules",
    "plan_classes",
    "plan_patterns",
    "render_patient_mr",
    "render_patient_slide",
    "render_radpath_slide",
    "write_radpath_cohort",
]

log = logging.getLogger(__name__)

#: The glioma classes, in the cohort's fixed class order.
CLASSES = ("glioblastoma", "oligodendroglioma", "astrocytoma")
#: Nuclear appearance of each class pattern: nuclei per area relative to one per (12 µm)²,
#: Gaussian nucleus radius (µm) and strength of a pale perinuclear halo in [0, 1].
WSI_PATTERNS = {
    "glioblastoma": {"density": 2.4, "sigma_um": 1.9, "halo": 0.0},
    "oligodendroglioma": {"density": 1.3, "sigma_um": 1.3, "halo": 0.8},
    "astrocytoma": {"density": 0.45, "sigma_um": 1.4, "halo": 0.0},
}
#: Ordinal grade of each class pattern on render_mr's lesion scale (enhancement, radius).
MR_GRADE = {"oligodendroglioma": 0, "astrocytoma": 1, "glioblastoma": 2}
#: Lesion features of render_mr that carry the MR grade.
MR_SIGNAL = ("enhancement", "radius")
#: Per-patient global MR intensity scale (uniform), the same for all four sequences.
MR_SCALE_RANGE = (0.85, 1.15)
#: Per-sequence gain on top of the global scale (uniform).
MR_SEQUENCE_GAIN_RANGE = (0.95, 1.05)
#: Per-slide multiplicative jitter of the nuclear density (log-normal sigma).
WSI_DENSITY_JITTER = 0.12
SIGNAL_DESCRIPTION = {
    "WSI": (
        "nuclear density, nucleus size and perinuclear halo per class pattern (WSI_PATTERNS); "
        "a slide shows its patient's class pattern with probability wsi_reliability, else "
        "another class's pattern drawn at random"
    ),
    "MR": (
        "lesion T1ce enhancement and radius rise with the shown pattern's grade "
        "(MR_GRADE: oligodendroglioma 0, astrocytoma 1, glioblastoma 2) scaled by "
        "mr_signal_strength; the MR shows its patient's class pattern with probability "
        "mr_reliability, else another class's pattern drawn at random (independently of "
        "the slide); per-patient global intensity scale and per-sequence gain as nuisance"
    ),
}

_NUCLEUS_SPACING_UM = 12.0
_DRAW_SCALE = 2
_BACKGROUND_RGB = (246.0, 246.0, 244.0)
_STROMA_RGB, _LIGHT_STROMA_RGB = (230.0, 150.0, 188.0), (246.0, 205.0, 224.0)
_NUCLEUS_RGB, _HALO_RGB = (78.0, 42.0, 118.0), (240.0, 214.0, 228.0)
_FLOAT_FIELDS = (
    "wsi_reliability",
    "mr_reliability",
    "mr_signal_strength",
    "mpp",
    "objective_power",
)
# Random streams: one independent generator per (stream, patient).
_ASSIGNMENT, _PATTERN, _MR, _WSI = range(4)


@dataclass(frozen=True)
class RadPathSettings:
    """What :func:`write_radpath_cohort` writes; the defaults make a small demo cohort.

    Attributes
    ----------
    n_patients
        Patients, at least one per class; the classes are assigned round-robin (balanced).
    seed
        Seed of every random draw.
    wsi_reliability, mr_reliability
        Probability that a modality shows its patient's class pattern (else another class's,
        drawn at random), in ``[0, 1]``; ``1/3`` makes it independent of the class.
    mr_signal_strength
        How much of the shown pattern's grade reaches the MR lesion, in ``[0, 1]``
        (:func:`mmdiag.synth.volumes.ordinal_level`); 0 removes it.
    mr_shape_vox, mr_spacing_mm
        MR grid ``(x, y, z)`` in voxels and voxel size in mm.
    slide_px, mpp, objective_power
        Level-0 side of the (square) slide, micrometres per pixel and objective power.
    n_levels, downsample, tile_px, jpeg_quality
        SVS pyramid levels, the factor between them, tile side and JPEG quality.
    """

    n_patients: int = 60
    seed: int = 0
    wsi_reliability: float = 0.9
    mr_reliability: float = 0.6
    mr_signal_strength: float = 0.5
    mr_shape_vox: tuple[int, int, int] = (32, 32, 24)
    mr_spacing_mm: tuple[float, float, float] = (5.0, 5.0, 6.0)
    slide_px: int = 1024
    mpp: float = 0.5
    objective_power: float = 20.0
    n_levels: int = 3
    downsample: int = 4
    tile_px: int = 256
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        """Reject settings that cannot give a valid cohort, naming the setting.

        Numbers are normalised to the fields' types (``20`` to ``20.0``, lists to tuples),
        so a setting spelt either way gives the same cohort, ``cohort.json`` included.
        """
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "mr_shape_vox", tuple(int(n) for n in self.mr_shape_vox))
        object.__setattr__(self, "mr_spacing_mm", tuple(float(s) for s in self.mr_spacing_mm))
        if self.n_patients < len(CLASSES):
            raise ValueError(f"n_patients must be >= {len(CLASSES)}, got {self.n_patients}")
        for name in ("wsi_reliability", "mr_reliability", "mr_signal_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.mr_shape_vox) != 3 or min(self.mr_shape_vox) < 8:
            raise ValueError(f"mr_shape_vox needs 3 entries >= 8, got {self.mr_shape_vox}")
        if len(self.mr_spacing_mm) != 3 or min(self.mr_spacing_mm) <= 0:
            raise ValueError(f"mr_spacing_mm needs 3 entries > 0, got {self.mr_spacing_mm}")
        if self.slide_px < 64 or self.mpp <= 0:
            raise ValueError(f"need slide_px >= 64 and mpp > 0, got {self.slide_px}, {self.mpp}")


def plan_classes(settings: RadPathSettings) -> list[str]:
    """Class of each patient: round-robin over :data:`CLASSES`, shuffled by the seed.

    Counts per class differ by at most one; the shuffle keeps the patient order from
    revealing the class.
    """
    return balanced_labels(CLASSES, settings.n_patients, stream_rng(settings.seed, _ASSIGNMENT))


def plan_patterns(settings: RadPathSettings, classes: list[str]) -> list[dict[str, str]]:
    """The class pattern each modality of each patient shows, ``{"WSI": ..., "MR": ...}``.

    A modality shows the patient's class with its reliability, else one of the other
    classes, drawn uniformly; the two modalities are drawn independently. The draws per
    patient are fixed in number, so one patient's patterns do not depend on the others'.
    """
    patterns = []
    for index, disease in enumerate(classes):
        rng = stream_rng(settings.seed, _PATTERN, index)
        keep = rng.uniform(size=2)
        pick = rng.integers(0, len(CLASSES) - 1, size=2)
        others = [c for c in CLASSES if c != disease]
        shown = {}
        for k, (modality, reliability) in enumerate(
            (("WSI", settings.wsi_reliability), ("MR", settings.mr_reliability))
        ):
            shown[modality] = disease if keep[k] < reliability else others[int(pick[k])]
        patterns.append(shown)
    return patterns


def manifest_rules(min_slide_px: int = 256) -> ManifestRules:
    """Manifest rules this cohort satisfies: the classes of :data:`CLASSES`, MR and WSI
    required.

    The config equivalent is ``classes: [glioblastoma, oligodendroglioma, astrocytoma]``,
    ``required_modalities: [MR, WSI]`` and ``min_image_px: {MR: 8, WSI: 256}``.
    """
    return ManifestRules(
        classes=CLASSES,
        required_modalities=("MR", "WSI"),
        min_image_px={"MR": 8, "WSI": min_slide_px},
    )


def render_patient_mr(
    settings: RadPathSettings, index: int, pattern: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """MR sequences (int16, ``[x, y, z]``, keyed by :data:`mmdiag.synth.mr.SEQUENCES`) and
    lesion mask of patient ``index`` showing the class ``pattern``.

    The lesion enhancement and radius follow :data:`MR_GRADE` scaled by
    ``mr_signal_strength``; the global scale and the per-sequence gains are drawn after
    :func:`mmdiag.synth.mr.render_mr`'s draws, whose number does not depend on the grade.
    """
    rng = stream_rng(settings.seed, _MR, index)
    sequences, mask, _ = mr.render_mr(
        rng,
        settings.mr_shape_vox,
        settings.mr_spacing_mm,
        grade=MR_GRADE[pattern],
        n_grades=len(CLASSES),
        signal_strength=settings.mr_signal_strength,
        signal=MR_SIGNAL,
    )
    scale = rng.uniform(*MR_SCALE_RANGE)
    gains = rng.uniform(*MR_SEQUENCE_GAIN_RANGE, size=len(mr.SEQUENCES))
    scaled = {
        name: np.clip(np.rint(sequences[name] * (scale * gain)), 0, 32767).astype(np.int16)
        for name, gain in zip(mr.SEQUENCES, gains, strict=True)
    }
    return scaled, mask


def render_radpath_slide(
    rng: np.random.Generator, size_px: int, *, mpp: float, pattern: str
) -> np.ndarray:
    """Render one square H&E-like slide of class ``pattern``, uint8 ``(size_px, size_px, 3)``.

    One large tissue fragment with a rough rim (pink stroma with fibre texture) on white
    glass, so that a slide of 1024 px holds about ten 256-px patches of mostly tissue;
    dark-purple nuclei with the density, size and halo of :data:`WSI_PATTERNS`, jittered per
    slide (density, nucleus size, stain colour). Drawn at ``1/_DRAW_SCALE`` of the pixel
    size and enlarged bilinearly, as :func:`mmdiag.synth.tet.render_tet_slide` does.
    """
    if pattern not in WSI_PATTERNS:
        raise ValueError(f"pattern must be one of {CLASSES}, got {pattern!r}")
    draw_px = max(size_px // _DRAW_SCALE, 32)
    small = _draw_slide(rng, draw_px, mpp=mpp * size_px / draw_px, **WSI_PATTERNS[pattern])
    return np.asarray(Image.fromarray(small).resize((size_px, size_px), Image.BILINEAR))


def _draw_slide(
    rng: np.random.Generator,
    size_px: int,
    *,
    mpp: float,
    density: float,
    sigma_um: float,
    halo: float,
) -> np.ndarray:
    """The slide of :func:`render_radpath_slide` drawn at ``size_px`` and ``mpp``."""
    density *= float(np.exp(rng.normal(0.0, WSI_DENSITY_JITTER)))
    sigma_um *= rng.uniform(0.95, 1.05)
    stain = rng.uniform(0.9, 1.1, 3)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32) / np.float32(size_px)
    centre = rng.uniform(0.47, 0.53, 2)
    semi = rng.uniform(0.41, 0.46, 2)
    radius = np.sqrt(((xx - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2)
    rim = 1.0 - radius + 0.08 * smooth_noise(rng, size_px, size_px, size_px / 8)
    border = np.minimum(np.minimum(xx, 1 - xx), np.minimum(yy, 1 - yy))
    tissue = soft_step(-rim, 0.01) * soft_step(0.02 - border, 0.004)

    stroma = np.empty((size_px, size_px, 3), np.float32)
    stroma[:] = _STROMA_RGB
    fibres = smooth_noise(rng, size_px, size_px, max(6.0 / mpp, 2.0))
    blend(stroma, _LIGHT_STROMA_RGB, soft_step(-fibres, 0.3) * 0.8)

    spacing_px = _NUCLEUS_SPACING_UM / mpp / np.sqrt(density)
    n_nuclei = int(size_px**2 / spacing_px**2)
    ys, xs = rng.uniform(0, size_px - 1, (2, n_nuclei))
    inside = tissue[ys.astype(np.int64), xs.astype(np.int64)] > 0.5
    sigma_px = max(sigma_um / mpp, 0.7)
    weights = rng.uniform(0.8, 1.4, n_nuclei)[inside]
    if halo > 0:
        halos = impulse_blobs((size_px, size_px), ys[inside], xs[inside], 2.2 * sigma_px)
        blend(stroma, _HALO_RGB, np.clip(halo * 1.5 * halos, 0.0, halo))
    nuclei = impulse_blobs((size_px, size_px), ys[inside], xs[inside], sigma_px, weights)
    blend(stroma, np.clip(np.array(_NUCLEUS_RGB) * stain, 0, 255), np.clip(1.7 * nuclei, 0, 0.95))

    image = np.empty_like(stroma)
    image[:] = _BACKGROUND_RGB
    blend(image, 0.0, tissue)
    image += stroma * tissue[..., None]
    image += rng.normal(0.0, 2.0, (size_px, size_px, 1)).astype(np.float32)
    return to_uint8(image)


def render_patient_slide(settings: RadPathSettings, index: int, pattern: str) -> np.ndarray:
    """Level-0 pixels of patient ``index``'s slide showing the class ``pattern``."""
    return render_radpath_slide(
        stream_rng(settings.seed, _WSI, index), settings.slide_px, mpp=settings.mpp, pattern=pattern
    )


def _patient_ids(n_patients: int) -> list[str]:
    width = max(3, len(str(n_patients)))
    return [f"RP{i + 1:0{width}d}" for i in range(n_patients)]


def _write_patient(
    folder: Path, settings: RadPathSettings, index: int, pid: str, shown: dict[str, str]
) -> list[dict[str, str]]:
    """Write patient ``index``'s MR case and slide; return its ``images.tsv`` rows."""
    sequences, mask = render_patient_mr(settings, index, shown["MR"])
    paths = mr.write_mr_case(folder / "mr", pid, sequences, mask, settings.mr_spacing_mm)
    rows = [
        {"patient_id": pid, "modality": "MR", "path": paths[name].relative_to(folder).as_posix()}
        for name in mr.SEQUENCES
    ]
    relative = f"wsi/{pid}.svs"
    wsi.write_svs(
        folder / relative,
        render_patient_slide(settings, index, shown["WSI"]),
        mpp=settings.mpp,
        objective_power=settings.objective_power,
        n_levels=settings.n_levels,
        downsample=settings.downsample,
        tile_px=settings.tile_px,
        jpeg_quality=settings.jpeg_quality,
    )
    rows.append({"patient_id": pid, "modality": "WSI", "path": relative})
    return rows


def write_radpath_cohort(root: str | Path, settings: RadPathSettings | None = None) -> Path:
    """Write the synthetic RadPath-like cohort folder at ``root`` and return ``root``.

    Parameters
    ----------
    root : path
        Cohort folder to create; an existing folder is replaced only once the new one is
        complete.
    settings : RadPathSettings, optional
        Cohort size, seed, planted-signal knobs and image geometry (default: the demo
        settings).

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
    settings = settings or RadPathSettings()
    root, started = Path(root), time.perf_counter()
    classes, pids = plan_classes(settings), _patient_ids(settings.n_patients)
    patterns = plan_patterns(settings, classes)
    images = []
    with atomic_path(root, is_dir=True) as folder:
        (folder / "mr").mkdir()
        (folder / "wsi").mkdir()
        for index, (pid, shown) in enumerate(zip(pids, patterns, strict=True)):
            images.extend(_write_patient(folder, settings, index, pid, shown))
        write_tsv(pd.DataFrame({"patient_id": pids, "disease": classes}), folder / "clinical.tsv")
        write_tsv(pd.DataFrame(images), folder / "images.tsv")
        write_json(_provenance(settings, pids, classes, patterns), folder / "cohort.json")
    log.info(
        "wrote RadPath cohort %s: %d patients, %d images in %.1f s",
        root,
        len(pids),
        len(images),
        time.perf_counter() - started,
    )
    return root


def _provenance(
    settings: RadPathSettings,
    pids: list[str],
    classes: list[str],
    patterns: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "mmdiag_version": mmdiag.__version__,
        "generator": "mmdiag.synth.radpath.write_radpath_cohort",
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "classes": list(CLASSES),
        "planted_signal": {
            "description": SIGNAL_DESCRIPTION,
            "wsi_patterns": WSI_PATTERNS,
            "mr_grade": MR_GRADE,
            "mr_signal_features": list(MR_SIGNAL),
            "mr_scale_range": list(MR_SCALE_RANGE),
            "mr_sequence_gain_range": list(MR_SEQUENCE_GAIN_RANGE),
            "wsi_density_jitter": WSI_DENSITY_JITTER,
        },
        "patients": [
            {"patient_id": p, "disease": c, "wsi_pattern": s["WSI"], "mr_pattern": s["MR"]}
            for p, c, s in zip(pids, classes, patterns, strict=True)
        ],
    }
