"""The patching stage when things go wrong: killed jobs, damaged slides, small and huge slides.

- Killing ``mmdiag patch`` (SIGKILL or SIGTERM) ends its worker processes too; SIGTERM exits
  with 143 and leaves no store behind.
- A damaged tile (JPEG in CMU-1-Small-Region.svs, JPEG 2000 in the TCGA slide, both real
  Aperio files damaged in a copy) fails with one line naming the file, level and region,
  in-process and through the worker pool, and leaves no store.
- A single-level slide's thumbnail is reduced band by band: bounded memory, PIL's pixels.
- Small slides run in-process whatever ``workers`` says (spawning costs more than decoding).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from mmdiag.data.manifest import MANIFEST_COLUMNS, write_manifest
from mmdiag.patching import engine
from mmdiag.patching import slide as slide_module
from mmdiag.patching.pipeline import patch_slide
from mmdiag.patching.slide import Slide, SlideReadError
from mmdiag.synth.wsi import write_single_level_tiff
from tests.patching_settings import patching_settings, slide_manifest_row

psutil = pytest.importorskip("psutil")

REAL_WSI = Path("/work/shared/data/real/wsi")
CMU = REAL_WSI / "CMU-1-Small-Region.svs"
TCGA = REAL_WSI / "tcga-cr-7395-01a-01-ts1.svs"
BIG_SLIDE_PX = 12288  # single level: about 150 Mpx to decode, enough for two worker processes

SETTINGS = patching_settings(default_mpp=0.5, workers=2)


def _real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    return path


def write_one_slide_manifest(folder: Path, slide: Path, image_id: str, mpp: float) -> Path:
    row = slide_manifest_row(image_id, slide, mpp)
    return write_manifest(pd.DataFrame([row])[list(MANIFEST_COLUMNS)], folder / "manifest.tsv")


def patch_command(folder: Path, slide: Path, mpp: float) -> list[str]:
    """``python -m mmdiag patch`` of one slide into ``folder/out`` (no Snakemake involved)."""
    manifest = write_one_slide_manifest(folder, slide, "slide", mpp)
    out = folder / "out"
    return [
        sys.executable,
        "-m",
        "mmdiag",
        "patch",
        "--manifest",
        str(manifest),
        "--image-id",
        "slide",
        "--out",
        str(out / "slide.zarr"),
        "--mask",
        str(out / "slide.png"),
        "--qc",
        str(out / "slide-qc.png"),
        "--settings-json",
        json.dumps({"patching": SETTINGS}),
    ]


def _working(process: psutil.Process) -> bool:
    """A spawned worker past its initializer: it has mapped the shared patch buffer."""
    try:
        if not any("spawn_main" in part for part in process.cmdline()):
            return False
        return "mmdiag-patches" in Path(f"/proc/{process.pid}/maps").read_text()
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return False


def _wait_for_workers(popen: subprocess.Popen, count: int, log: Path, timeout_s: float = 90):
    """Every process below ``popen`` once ``count`` workers are at work (fails if it ends).

    Waiting for the initializer matters: a worker killed before it maps the parent's buffer
    dies of that alone, and would not show whether the parent's death ends a working one.
    """
    parent = psutil.Process(popen.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            pytest.fail(f"mmdiag patch ended ({popen.returncode}) first:\n{log.read_text()}")
        below = parent.children(recursive=True)
        if sum(_working(child) for child in below) >= count:
            return below
        time.sleep(0.05)
    pytest.fail(f"no {count} workers within {timeout_s} s:\n{log.read_text()}")


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie waits for PID 1 to reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(processes: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in processes if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


# -- workers end with their parent -----------------------------------------------------------
@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> Path:
    return write_single_level_tiff(tmp_path_factory.mktemp("big") / "big.tif", BIG_SLIDE_PX)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_mmdiag_patch_ends_its_workers(tmp_path, big_slide, signum):
    log = tmp_path / "patch.log"
    with open(log, "w") as stderr:
        popen = subprocess.Popen(
            patch_command(tmp_path, big_slide, mpp=0.5), cwd=tmp_path, stderr=stderr
        )
    try:
        below = _wait_for_workers(popen, 2, log)
        popen.send_signal(signum)
        returncode = popen.wait(timeout=30)
        assert _survivors(below, within_s=5) == []
    finally:
        if popen.poll() is None:
            popen.kill()
    out = tmp_path / "out"
    assert not (out / "slide.zarr").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if signum == signal.SIGTERM:  # a clean exit: clean-up ran, no traceback
        assert returncode == 128 + signal.SIGTERM
        assert "Traceback" not in log.read_text()
    else:
        assert returncode == -signal.SIGKILL


def test_worker_exits_at_once_when_its_parent_is_already_gone():
    # The parent pid given is not this process's parent: the parent "died" before the
    # initializer ran, so the worker must not start working.
    code = "from mmdiag.patching.workers import end_with_parent; end_with_parent(1); print('up')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    code = "import os; from mmdiag.patching.workers import end_with_parent\n"
    code += "end_with_parent(os.getppid()); print('up')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "up\n"


def test_watchdog_ends_an_orphan_where_no_parent_death_signal_exists():
    # A plain Python parent (no CLI) starts a child that relies on the watchdog thread alone.
    child = textwrap.dedent(
        """
        import os, time
        from mmdiag.patching.workers import start_watchdog
        start_watchdog(os.getppid(), interval_s=0.1)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE)
        child.stdout.readline()
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    popen = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        orphan = psutil.Process(int(popen.stdout.readline()))
        popen.kill()
        popen.wait(timeout=10)
        assert _survivors([orphan], within_s=5) == []
    finally:
        if popen.poll() is None:
            popen.kill()


# -- damaged files are named ----------------------------------------------------------------
def damage_tile(source: Path, target: Path, page: int, index: int) -> tuple[int, int, int, int]:
    """Copy ``source`` to ``target`` with tile ``index`` of TIFF page ``page`` zeroed.

    Returns the tile's rectangle ``(x, y, w, h)`` in that page's pixels.
    """
    shutil.copyfile(source, target)
    with tifffile.TiffFile(target) as tiff:
        tiff_page = tiff.pages[page]
        offset = tiff_page.dataoffsets[index]
        count = tiff_page.databytecounts[index]
        tile_w, tile_h = tiff_page.tilewidth, tiff_page.tilelength
        columns = math.ceil(tiff_page.imagewidth / tile_w)
    with open(target, "r+b") as file:
        file.seek(offset)
        file.write(bytes(count))
    return (index % columns) * tile_w, (index // columns) * tile_h, tile_w, tile_h


@pytest.fixture
def damaged(tmp_path, request) -> tuple[Path, tuple[int, int, int, int], str]:
    """A real slide with one level-0 tile zeroed, its tile rectangle and the decoder's word."""
    name = request.param
    if name == "jpeg":
        slide = damage_tile(_real(CMU), tmp_path / "cmu damaged.svs", 0, 47)
        return tmp_path / "cmu damaged.svs", slide, "Not a JPEG file"
    slide = damage_tile(_real(TCGA), tmp_path / "tcga damaged.svs", 0, 135)
    return tmp_path / "tcga damaged.svs", slide, "OpenJPEG error"


def _assert_names_the_tile(message: str, path: Path, tile, reason: str) -> None:
    pattern = (
        rf"{re.escape(str(path))}: cannot decode level 0 "
        rf"region x=(\d+),y=(\d+),w=(\d+),h=(\d+) \({re.escape(reason)}[^\n]*\)"
    )
    match = re.fullmatch(pattern, message)
    assert match, message
    x, y, w, h = map(int, match.groups())
    tile_x, tile_y, tile_w, tile_h = tile
    assert x < tile_x + tile_w and tile_x < x + w and y < tile_y + tile_h and tile_y < y + h


def _grid(width: int, height: int, side: int) -> np.ndarray:
    return np.array([[x, y, side] for y in range(0, height, side) for x in range(0, width, side)])


@pytest.mark.parametrize("damaged", ["jpeg", "jpeg2000"], indirect=True)
@pytest.mark.parametrize("workers", [1, 2])
def test_damaged_tile_is_named_in_process_and_through_workers(damaged, workers, monkeypatch):
    path, tile, reason = damaged
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)  # small slide, yet through the pool
    with Slide(path, default_mpp=0.5) as slide:
        width, height = slide.info.level_dimensions[0]
    with pytest.raises(SlideReadError) as error:
        engine.extract_patches(
            path, _grid(width, height, 256), out_px=256, workers=workers, block_px=512
        )
    _assert_names_the_tile(str(error.value), path, tile, reason)


@pytest.mark.parametrize("damaged", ["jpeg"], indirect=True)
def test_damaged_tile_is_named_by_the_thumbnail(damaged):
    path, tile, reason = damaged
    with Slide(path) as slide, pytest.raises(SlideReadError) as error:
        slide.thumbnail(8.0)
    _assert_names_the_tile(str(error.value), path, tile, reason)


@pytest.mark.parametrize("damaged", ["jpeg", "jpeg2000"], indirect=True)
def test_patch_slide_of_a_damaged_slide_leaves_no_store(damaged, tmp_path, monkeypatch):
    # CMU fails in the thumbnail (one level); TCGA's thumbnail comes from its intact level 1,
    # so it fails in the engine's workers.
    path, tile, reason = damaged
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)
    out = tmp_path / "out"
    with pytest.raises(SlideReadError) as error:
        patch_slide(
            path,
            SETTINGS,
            store_path=out / "slide.zarr",
            mask_path=out / "slide.png",
            qc_path=out / "slide-qc.png",
            progress=False,
        )
    _assert_names_the_tile(str(error.value), path, tile, reason)
    assert not (out / "slide.zarr").exists()
    assert not [p.name for p in out.glob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damaged", ["jpeg"], indirect=True)
def test_cli_prints_one_line_for_a_damaged_slide(damaged, tmp_path):
    path, tile, reason = damaged
    done = subprocess.run(
        patch_command(tmp_path, path, mpp=0.499), cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    _assert_names_the_tile(errors[0].removeprefix("error: "), path, tile, reason)
    assert not (tmp_path / "out" / "slide.zarr").exists()


# -- thumbnails of single-level slides --------------------------------------------------------
# VmHWM is this process's own peak: ru_maxrss would start at the parent's peak (Linux carries
# it over fork and exec), which inside a long test session hides the thumbnail's.
THUMBNAIL_PEAK = """
import sys
from mmdiag.patching.slide import Slide

def peak_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

with Slide(sys.argv[1], mpp_override=0.5) as slide:
    before = peak_bytes()
    image, _ = slide.thumbnail(8.0)
print(slide.info.backend, image.shape[0], image.shape[1], peak_bytes() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_single_level_thumbnail_memory_stays_far_below_the_level(tmp_path):
    size_px = 12000
    path = write_single_level_tiff(tmp_path / "single.tif", size_px)
    done = subprocess.run(
        [sys.executable, "-c", THUMBNAIL_PEAK, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    backend, height, width, grown_bytes = done.stdout.split()
    assert (backend, int(height), int(width)) == ("pyvips", 750, 750)
    level_bytes = size_px * size_px * 3  # 432 MB; decoding it whole peaked at 1.0 GB more
    assert 0 < int(grown_bytes) < level_bytes / 3


@pytest.mark.parametrize(
    ("in_w", "in_h", "out_w", "out_h"),
    [(2202, 2202, 152, 152), (997, 1301, 61, 81), (640, 480, 640, 37), (50, 333, 7, 333)],
)
def test_box_weights_replay_pils_vertical_pass(in_w, in_h, out_w, out_h):
    # 2202 -> 152 has exact ties (row 38 * 2202 / 152 = 550.5) that float rounding decides.
    rng = np.random.default_rng(in_h)
    image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BOX))
    rows = np.asarray(Image.fromarray(image).resize((out_w, in_h), Image.BOX))
    starts, _counts, weights = slide_module._box_weights(in_h, out_h)
    np.testing.assert_array_equal(slide_module._vertical_box(rows, starts, weights), expected)


@pytest.mark.parametrize("target_mpp", [1.3, 3.3, 8.0])
@pytest.mark.parametrize("band_px", [1 << 22, 20_000])
def test_banded_thumbnail_equals_the_whole_level_resize(target_mpp, band_px, monkeypatch):
    # CMU has one level (2220 x 2967): a whole-level read resized by PIL was the thumbnail.
    monkeypatch.setattr(slide_module, "_THUMBNAIL_BAND_PX", band_px)
    with Slide(_real(CMU)) as slide:
        image, mpp = slide.thumbnail(target_mpp)
        whole = slide.read_level(0, 0, 0, 2220, 2967)
    expected = np.asarray(Image.fromarray(whole).resize(image.shape[1::-1], Image.BOX))
    np.testing.assert_array_equal(image, expected)
    assert mpp == pytest.approx(target_mpp, rel=0.01)


# -- workers by slide size ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("workers", "n_blocks", "decoded_px", "expected"),
    [
        (1, 100, 100 << 26, 1),  # asked for one
        (2, 1, 100 << 26, 1),  # one block cannot be split
        (2, 4, 19_000_000, 1),  # the DAPI NDPI slide: decoding is faster than spawning
        (2, 50, (1 << 26) - 1, 1),
        (2, 50, 1 << 26, 1),
        (2, 50, 2 << 26, 2),
        (8, 50, 5 << 26, 5),
        (8, 3, 5 << 26, 3),
        (4, 50, 100 << 26, 4),
        (3, 0, 0, 1),
    ],
)
def test_worker_count_rule(workers, n_blocks, decoded_px, expected):
    assert engine.worker_count(workers, n_blocks, decoded_px) == expected


def test_small_slide_with_two_workers_runs_in_process(monkeypatch, caplog):
    class NoPool:
        started = 0

        def __init__(self, *args, **kwargs):
            NoPool.started += 1
            raise AssertionError("a process pool was started")

    monkeypatch.setattr(engine, "ProcessPoolExecutor", NoPool)
    regions = _grid(2220, 2967, 256)
    with caplog.at_level("INFO", logger="mmdiag.patching.engine"):
        patches = engine.extract_patches(_real(CMU), regions, out_px=64, workers=2, block_px=512)
    assert patches.shape == (len(regions), 64, 64, 3) and NoPool.started == 0
    assert "1 process(es) (workers=2" in caplog.text
    # the same call on a slide that pays for two workers would start the pool
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)
    with pytest.raises(AssertionError, match="pool was started"):
        engine.extract_patches(_real(CMU), regions, out_px=64, workers=2, block_px=512)
    assert NoPool.started == 1


def test_pool_gives_the_in_process_patches_and_leaves_no_worker(monkeypatch):
    # Small slides now run in-process; forced through the pool, the shared-buffer path must
    # give the same pixels, and its workers must be gone once the call returns.
    pools = []

    class CountingPool(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs["max_workers"])
            super().__init__(*args, **kwargs)

    regions = _grid(2220, 2967, 384)
    alone = engine.extract_patches(_real(CMU), regions, out_px=128, workers=1, block_px=512)
    monkeypatch.setattr(engine, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setattr(engine, "MIN_PX_PER_WORKER", 1)
    pooled = engine.extract_patches(_real(CMU), regions, out_px=128, workers=2, block_px=512)
    assert pools == [2]
    np.testing.assert_array_equal(pooled, alone)
    assert _survivors(_spawned_children(), within_s=5) == []


def _spawned_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children
