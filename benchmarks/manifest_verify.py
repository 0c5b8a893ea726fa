"""Benchmark: what the manifest's ``verify: decode`` check costs per real slide.

For each slide of ``../shared/data/real/wsi/`` (or ``--folder``), times the header check the
manifest always makes (:func:`mmdiag.data.images.read_image_size`) and the decode check of
``verify: decode`` (:func:`mmdiag.data.images.check_image_decodes`, 8 regions per level by
default), both in this process, median of ``--repeats`` runs after one warm-up, and prints the
ratio decode / header.

Run: ``.venv/bin/python benchmarks/manifest_verify.py [--regions-per-level 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mmdiag.data.images import check_image_decodes, read_image_size, slide_sample_regions
from mmdiag.patching.engine import open_reader

REAL_WSI = Path(__file__).resolve().parents[2] / "shared/data/real/wsi"


def median_seconds(work, repeats: int) -> float:
    work()  # warm-up: file cache, library loading
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def count_regions(slide: Path, regions_per_level: int) -> int:
    reader = open_reader(slide)
    try:
        regions = slide_sample_regions(
            reader.level_dimensions,
            reader.level_downsamples,
            regions_per_level=regions_per_level,
        )
    finally:
        reader.close()
    return len(regions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=REAL_WSI)
    parser.add_argument("--regions-per-level", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    slides = sorted(p for p in args.folder.iterdir() if p.is_file())
    if not slides:
        raise SystemExit(f"{args.folder}: no slides")
    print(f"{'slide':34} {'regions':>7} {'header s':>9} {'decode s':>9} {'decode/header':>13}")
    for slide in slides:
        regions = count_regions(slide, args.regions_per_level)
        header = median_seconds(lambda s=slide: read_image_size(s, modality="WSI"), args.repeats)
        decode = median_seconds(
            lambda s=slide: check_image_decodes(
                s, modality="WSI", regions_per_level=args.regions_per_level
            ),
            args.repeats,
        )
        print(f"{slide.name:34} {regions:7d} {header:9.4f} {decode:9.4f} {decode / header:13.1f}")


if __name__ == "__main__":
    main()
