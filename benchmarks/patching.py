"""Benchmark: multi-scale patch extraction, per-patch level-0 reads vs the block engine.

Writes a synthetic tiled-JPEG Aperio-style SVS (levels 20480, 5120, 1280, 320 px by default,
tile 256, JPEG Q85, 0.5 um/px at 20x) into a temporary folder, lays a grid of 256-px 20x
patches over its tissue, each with concentric 10x and 5x contexts (512 and 1024 level-0 px,
same centre), and times, in tiles/s (one tile = one 20x patch and its two contexts, all
resized to 256 px):

- baseline: the authors' way (CS-MIL): per patch three level-0 ``read_region`` calls, contexts
  resized to 256, one PNG file per patch per scale; timed on the first ``--baseline-n`` patches
  and extrapolated;
- ours: ``extract_patches`` per scale, and ``extract_patches_multiscale`` (scales sharing a
  level share blocks), with 1 and 2 workers, results in memory;
- decode limit: ``read_region`` of every ``block_px`` grid cell touched by the regions, at each
  level the engine reads (level 0 for 20x and 10x, the 4x level for 5x), each once.

Run: ``.venv/bin/python benchmarks/patching.py [--size 20480]``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from mmdiag.patching.engine import choose_level, extract_patches, extract_patches_multiscale

TILE_PX = 256
PATCH_PX = 256  # 20x patch, level-0 px (level 0 is 20x here)
CONTEXT_PX = (256, 512, 1024)  # 20x, 10x, 5x; same centres
LEVEL_DOWNSAMPLE = 4
N_LEVELS = 4


def _tissue_field(coarse: Image.Image, y0: int, rows: int, width: int, scale: int) -> np.ndarray:
    """Rows ``y0 : y0 + rows`` of the coarse field bilinearly upsampled to full resolution."""
    box = (0, y0 / scale, coarse.width, (y0 + rows) / scale)
    return np.asarray(coarse.resize((width, rows), Image.Resampling.BILINEAR, box=box))


def write_synthetic_svs(path: Path, size_px: int, seed: int = 0) -> None:
    """A tissue-like slide: smooth stained blobs on white glass plus noise, built band by band."""
    rng = np.random.default_rng(seed)
    scale = 64
    n_coarse = size_px // scale + 1
    # Channel 0-2: stain colour field; channel 3 (kept separately): tissue density.
    colour = rng.integers(90, 220, (n_coarse, n_coarse, 3), dtype=np.uint8)
    colour[..., 1] = colour[..., 1] // 2 + 40  # pinkish (H&E-like: low green)
    density = rng.random((n_coarse // 8 + 1, n_coarse // 8 + 1)) * 255
    density_img = Image.fromarray(density.astype(np.uint8)).resize(
        (n_coarse, n_coarse), Image.Resampling.BICUBIC
    )
    colour_img = Image.fromarray(colour)
    density_img = Image.fromarray(np.asarray(density_img))

    level_sizes = [size_px // LEVEL_DOWNSAMPLE**i for i in range(N_LEVELS)]
    level1 = np.empty((level_sizes[1], level_sizes[1], 3), np.uint8)

    def level0_tiles():
        for y0 in range(0, size_px, TILE_PX):
            rgb = _tissue_field(colour_img, y0, TILE_PX, size_px, scale).astype(np.int16)
            dens = _tissue_field(density_img, y0, TILE_PX, size_px, scale).astype(np.int16)
            tissue = (dens > 110)[..., None]
            noise = rng.integers(-25, 25, (TILE_PX, size_px, 1), dtype=np.int16)
            band = np.where(tissue, rgb + noise, 242 + noise // 5).clip(0, 255).astype(np.uint8)
            d = LEVEL_DOWNSAMPLE
            level1[y0 // d : (y0 + TILE_PX) // d] = (
                band.reshape(TILE_PX // d, d, size_px // d, d, 3).mean((1, 3)).astype(np.uint8)
            )
            for x0 in range(0, size_px, TILE_PX):
                yield band[:, x0 : x0 + TILE_PX]

    def description(level: int) -> str:
        w = h = size_px
        if level == 0:
            return (
                f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=85"
                "|AppMag = 20|MPP = 0.5"
            )
        lw = lh = level_sizes[level]
        return f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {lw}x{lh} - |AppMag = 20|MPP = 0.5"

    common = dict(
        tile=(TILE_PX, TILE_PX),
        compression="jpeg",
        compressionargs={"level": 85},
        photometric="rgb",
        metadata=None,
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            level0_tiles(),
            shape=(size_px, size_px, 3),
            dtype=np.uint8,
            description=description(0),
            subfiletype=0,
            **common,
        )
        level = level1
        for i in range(1, N_LEVELS):
            tw.write(level, description=description(i), subfiletype=1, **common)
            d, n = LEVEL_DOWNSAMPLE, level_sizes[i] // LEVEL_DOWNSAMPLE
            level = level[: n * d, : n * d].reshape(n, d, n, d, 3).mean((1, 3)).astype(np.uint8)


def tissue_grid(slide_path: Path) -> np.ndarray:
    """Centres (level-0 px) of the 256-px grid cells that are mostly tissue (thumbnail mask)."""
    slide = openslide.OpenSlide(str(slide_path))
    level = slide.level_count - 1
    ds = round(slide.level_downsamples[level])
    thumb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))[..., :3]
    tissue = thumb.mean(axis=2) < 220
    cells_per_patch = PATCH_PX // ds
    w0, h0 = slide.dimensions
    nx, ny = w0 // PATCH_PX, h0 // PATCH_PX
    cells = tissue[: ny * cells_per_patch, : nx * cells_per_patch]
    frac = cells.reshape(ny, cells_per_patch, nx, cells_per_patch).mean((1, 3))
    iy, ix = np.nonzero(frac >= 0.5)
    slide.close()
    return np.stack([ix * PATCH_PX + PATCH_PX // 2, iy * PATCH_PX + PATCH_PX // 2], axis=1)


def regions_for(centres: np.ndarray, size: int) -> np.ndarray:
    return np.column_stack([centres - size // 2, np.full(len(centres), size)]).astype(np.int64)


def run_baseline(slide_path: Path, centres: np.ndarray, out_dir: Path) -> float:
    """CS-MIL style: three level-0 reads per patch, resize, one PNG per patch and scale."""
    slide = openslide.OpenSlide(str(slide_path))
    start = time.perf_counter()
    for i, (cx, cy) in enumerate(centres.tolist()):
        for size in CONTEXT_PX:
            img = slide.read_region((cx - size // 2, cy - size // 2), 0, (size, size))
            img = img.convert("RGB")
            if size != PATCH_PX:
                img = img.resize((PATCH_PX, PATCH_PX))
            img.save(out_dir / f"{i}_{size}.png")
    elapsed = time.perf_counter() - start
    slide.close()
    return elapsed


_decode_slide = None


def _decode_init(path: str) -> None:
    global _decode_slide
    _decode_slide = openslide.OpenSlide(path)


def _decode_cell(args) -> int:
    level, x0, y0, w, h = args
    _decode_slide.read_region((x0, y0), level, (w, h))
    return w * h


def decode_cells(slide_path: Path, scales: list[np.ndarray], block_px: int) -> list[tuple]:
    """Every block_px grid cell (at the level the engine reads) that some region overlaps."""
    slide = openslide.OpenSlide(str(slide_path))
    downsamples, dims = slide.level_downsamples, slide.level_dimensions
    slide.close()
    cells = set()
    for regions in scales:
        level = choose_level(downsamples, int(regions[0, 2]), PATCH_PX)
        ds = downsamples[level]
        side = math.ceil(regions[0, 2] / ds)
        lx, ly = np.floor(regions[:, 0] / ds), np.floor(regions[:, 1] / ds)
        w, h = dims[level]
        for x, y in zip(lx.tolist(), ly.tolist(), strict=True):
            xs = range(max(0, int(x)) // block_px, min(w - 1, int(x) + side - 1) // block_px + 1)
            ys = range(max(0, int(y)) // block_px, min(h - 1, int(y) + side - 1) // block_px + 1)
            cells.update((level, cx, cy) for cx in xs for cy in ys)
    jobs = []
    for level, cx, cy in sorted(cells):
        ds = downsamples[level]
        w, h = dims[level]
        x, y = cx * block_px, cy * block_px
        jobs.append(
            (level, round(x * ds), round(y * ds), min(block_px, w - x), min(block_px, h - y))
        )
    return jobs


def run_decode(slide_path: Path, jobs: list[tuple], workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    if workers == 1:
        _decode_init(str(slide_path))
        pixels = sum(_decode_cell(job) for job in jobs)
    else:
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_decode_init,
            initargs=(str(slide_path),),
        ) as pool:
            pixels = sum(pool.map(_decode_cell, jobs))
    return time.perf_counter() - start, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20480, help="level-0 side, px")
    parser.add_argument("--baseline-n", type=int, default=300, help="patches timed for baseline")
    parser.add_argument("--block-px", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-") as tmp:
        tmp = Path(tmp)
        slide_path = tmp / "synthetic.svs"
        start = time.perf_counter()
        write_synthetic_svs(slide_path, args.size)
        gen_s = time.perf_counter() - start
        slide = openslide.OpenSlide(str(slide_path))
        print(
            f"slide: {slide.dimensions[0]}x{slide.dimensions[1]} px, levels "
            f"{slide.level_dimensions}, vendor {slide.properties['openslide.vendor']}, "
            f"mpp {slide.properties['openslide.mpp-x']}, "
            f"{os.path.getsize(slide_path) / 2**20:.0f} MiB, generated in {gen_s:.1f} s"
        )
        slide.close()
        centres = tissue_grid(slide_path)
        n = len(centres)
        scales = [regions_for(centres, size) for size in CONTEXT_PX]
        print(f"tiles: {n} tissue patches of 256 px at 20x, with 512/1024-px 10x/5x contexts")
        print(f"cpus: {os.cpu_count()}, block_px {args.block_px}")

        rows = []
        png_dir = tmp / "png"
        png_dir.mkdir()
        subset = centres[: args.baseline_n]
        seconds = run_baseline(slide_path, subset, png_dir)
        base_rate = len(subset) / seconds
        rows.append(("baseline (level-0 read_region + PNG)", len(subset), seconds, base_rate))

        timings = {}
        for workers in (1, 2):
            start = time.perf_counter()
            for regions in scales:
                extract_patches(slide_path, regions, out_px=PATCH_PX, workers=workers)
            seconds = time.perf_counter() - start
            timings[("per-scale", workers)] = n / seconds
            rows.append((f"ours, extract_patches x3, {workers} worker(s)", n, seconds, n / seconds))
        for workers in (1, 2):
            start = time.perf_counter()
            outputs = extract_patches_multiscale(
                slide_path, scales, out_px=PATCH_PX, workers=workers, block_px=args.block_px
            )
            seconds = time.perf_counter() - start
            timings[("multiscale", workers)] = n / seconds
            rows.append((f"ours, multiscale, {workers} worker(s)", n, seconds, n / seconds))
            del outputs

        jobs = decode_cells(slide_path, scales, args.block_px)
        decode_rates = {}
        for workers in (1, 2):
            seconds, pixels = run_decode(slide_path, jobs, workers)
            decode_rates[workers] = n / seconds
            rows.append(
                (
                    f"decode limit ({len(jobs)} blocks, {pixels / 1e6:.0f} Mpx), {workers} proc",
                    n,
                    seconds,
                    n / seconds,
                )
            )

        print(f"\n{'method':<52} {'tiles':>7} {'seconds':>9} {'tiles/s':>9}")
        for name, count, seconds, rate in rows:
            print(f"{name:<52} {count:>7} {seconds:>9.2f} {rate:>9.1f}")
        print()
        for kind in ("per-scale", "multiscale"):
            one, two = timings[(kind, 1)], timings[(kind, 2)]
            print(
                f"{kind:>10}: ours/baseline 1w {one / base_rate:.1f}x, 2w {two / base_rate:.1f}x;"
                f" ours/decode-limit 1w {one / decode_rates[1]:.2f}, 2w {two / decode_rates[2]:.2f}"
                f" (2w vs 1-proc limit {two / decode_rates[1]:.2f});"
                f" 2w/1w scaling {two / one:.2f}"
            )
        print(f"decode limit 2 proc / 1 proc: {decode_rates[2] / decode_rates[1]:.2f}")


if __name__ == "__main__":
    main()
