"""CMUS input pipeline: decode once and keep uint8 tensors, versus decoding every epoch.

The trainer decodes, crops and resizes each patient's OM, IM and TEM images once per fold and
batches from memory (``mmdiag.methods.cmus.data``). The baseline is what a plain per-item
Dataset does: decode and resize every image again in every epoch. Both produce the same
normalised batches; the script prints the time of one epoch's worth of batches each way and
their ratio.

    python benchmarks/bench_cmus_data.py [--patients 60] [--size 224] [--epochs 3] [--paper-scale]

``--paper-scale`` writes micrographs at the paper's geometry (OM/IM 3072x2048, TEM 2048x2048
with a 108-row legend) instead of the demo's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mmdiag.config import load_config
from mmdiag.data.manifest import ManifestRules, build_manifest
from mmdiag.methods.cmus.data import collate_patients, load_patient_samples
from mmdiag.synth import write_synthetic_cohort

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--size", type=int, default=224, help="input size in px (paper: 224)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--paper-scale", action="store_true", help="paper-sized micrographs")
    args = parser.parse_args()

    config = load_config([ROOT / "config/config.yaml", ROOT / "config/methods/cmus.yaml"])
    settings = dict(config["synth"], n_patients=args.patients)
    if args.paper_scale:
        settings |= {
            "om_size_px": [3072, 2048],
            "im_size_px": [3072, 2048],
            "tem_size_px": 2048,
            "tem_legend_px": 108,
        }
    with tempfile.TemporaryDirectory() as folder:
        cohort = write_synthetic_cohort(Path(folder) / "cohort", settings, progress=False)
        rules = ManifestRules(
            classes=tuple(config["manifest"]["classes"]),
            stages=tuple(config["manifest"]["stages"]),
            required_modalities=("OM", "IM", "TEM"),
        )
        manifest = build_manifest(cohort_root=cohort, rules=rules)
        patients = sorted(manifest["patient_id"].unique())
        load = dict(
            label_column="disease",
            classes=("IgAN", "MN", "LN"),
            image_size_px=args.size,
            tem_legend_px=settings["tem_legend_px"],
            max_tem_per_patient=12,
        )

        def batches(samples):
            for start in range(0, len(samples), 4):
                collate_patients(
                    samples[start : start + 4],
                    mean=MEAN,
                    std=STD,
                    augment_generator=torch.Generator().manual_seed(start),
                )

        started = time.perf_counter()
        for _ in range(args.epochs):  # baseline: decode every image again in every epoch
            batches(load_patient_samples(manifest, patients, **load))
        per_epoch_decoding = (time.perf_counter() - started) / args.epochs

        started = time.perf_counter()
        cached = load_patient_samples(manifest, patients, **load)
        decode_once = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.epochs):
            batches(cached)
        per_epoch_cached = (time.perf_counter() - started) / args.epochs

    n_images = len(manifest[manifest["modality"].isin(["OM", "IM", "TEM"])])
    print(f"{len(patients)} patients, {n_images} images at {args.size} px, {args.epochs} epochs")
    print(f"decode every epoch : {per_epoch_decoding:7.3f} s/epoch")
    print(f"decode once        : {per_epoch_cached:7.3f} s/epoch (+ {decode_once:.3f} s once)")
    print(f"ratio              : {per_epoch_decoding / per_epoch_cached:7.1f}x faster per epoch")


if __name__ == "__main__":
    main()
