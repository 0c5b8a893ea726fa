"""Benchmark: the peak memory of a single-level slide's thumbnail, banded versus whole level.

Writes a single-level tiled-JPEG TIFF of ``--size`` px square (default 16 384) into a temporary
folder and, each in a fresh process, makes its 8 µm/px thumbnail at 0.5 µm/px two ways:

- baseline: the whole level decoded at once (``Slide.read_level`` of the full level) and
  resized with PIL's BOX filter, the way a single-level slide was reduced before;
- ours: ``Slide.thumbnail``, which reduces the level band by band, bit-identical to the above.

Prints each process's peak resident memory above what it held before the thumbnail (VmHWM),
the seconds, and the ratios; checks that the two thumbnails are equal.

Run: ``.venv/bin/python benchmarks/thumbnail_memory.py [--size 16384]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmdiag.synth.wsi import write_single_level_tiff

CHILD = """
import sys, time
import numpy as np
from PIL import Image
from mmdiag.patching.slide import Slide

def peak_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

path, way, out = sys.argv[1:]
with Slide(path, mpp_override=0.5) as slide:
    before, started = peak_bytes(), time.perf_counter()
    if way == "banded":
        image, _ = slide.thumbnail(8.0)
    else:
        width, height = slide.info.level_dimensions[0]
        whole = slide.read_level(0, 0, 0, width, height)
        size = (round(width * 0.5 / 8.0), round(height * 0.5 / 8.0))
        image = np.asarray(Image.fromarray(whole).resize(size, Image.BOX))
    seconds = time.perf_counter() - started
np.save(out, image)
print(peak_bytes() - before, seconds)
"""


def measure(path: Path, way: str, out: Path) -> tuple[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), way, str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    grown, seconds = done.stdout.split()
    return int(grown), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        slide = write_single_level_tiff(folder / "single.tif", args.size)
        whole = measure(slide, "whole", folder / "whole.npy")
        banded = measure(slide, "banded", folder / "banded.npy")
        equal = np.array_equal(np.load(folder / "whole.npy"), np.load(folder / "banded.npy"))
    print(f"single-level {args.size}² tiled JPEG TIFF, thumbnail at 8 µm/px")
    for name, (grown, seconds) in (("whole level (baseline)", whole), ("banded", banded)):
        print(f"  {name:24} peak +{grown / 2**20:8.0f} MiB  {seconds:6.2f} s")
    print(f"  memory whole/banded {whole[0] / banded[0]:.1f}x, time {whole[1] / banded[1]:.2f}x")
    print(f"  thumbnails equal: {equal}")


if __name__ == "__main__":
    main()
