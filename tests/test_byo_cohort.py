"""README, "Bring your own cohort", followed literally on real scanner-made slides.

The section's named blocks (the cohort's two tables, ``mine.yaml``) are written as they stand,
each slide path of ``images.tsv`` is filled with a real slide of that format, and the
section's command lines run in order in a copy of the workflow: ``mmdiag`` and Snakemake for
real, a line asking for a method's ``fold_all.tsv`` as a dry run (training is tested
elsewhere). The same run then checks that only what changed is redone: a new patient, a slide
replaced in place, a changed ``mpp``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mmdiag.io import sha256_file
from mmdiag.patching.store import open_patch_store
from tests.test_workflow import copy_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_WSI = Path("/work/shared/data/real/wsi")
#: The real slide that stands in for each format the section's images.tsv names.
SLIDE_OF_SUFFIX = {
    ".svs": "CMU-1-Small-Region.svs",
    ".ndpi": "test3-DAPI-2-387.ndpi",
    ".ome.tif": "OS-2-ndpi.ome.tif",
}
NEW_PATIENT_SLIDE = "tcga-cr-7395-01a-01-ts1.svs"
REPLACEMENT_SLIDE = "test3-TRITC-2-560.ndpi"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every ``` block, in order."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                blocks.append((language, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def named_files(blocks) -> dict[str, str]:
    """Blocks whose first line is ``# <path>``: the file's path and its text."""
    files = {}
    for _, lines in blocks:
        named = re.fullmatch(r"#\s*(\S+\.(?:tsv|ya?ml))\s*", lines[0]) if lines else None
        if named:
            files[named.group(1)] = "\n".join(lines[1:]) + "\n"
    return files


def command_lines(blocks) -> list[list[str]]:
    return [
        shlex.split(line, comments=True)
        for language, lines in blocks
        if language == ""
        for line in lines
        if line.startswith(("mmdiag ", "snakemake "))
    ]


def run(tokens: list[str], cwd: Path, *, dry_run: bool = False) -> subprocess.CompletedProcess:
    program = {"mmdiag": [sys.executable, "-m", "mmdiag"], "snakemake": [str(BIN / "snakemake")]}
    command = [*program[tokens[0]], *tokens[1:]]
    if dry_run:
        command.insert(len(program[tokens[0]]), "--dry-run")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def real_slide(name: str) -> Path:
    path = REAL_WSI / name
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent")
    return path


def fill_slides(cohort: Path) -> None:
    """A real slide of the written format at each WSI path of images.tsv."""
    images = pd.read_csv(cohort / "images.tsv", sep="\t", dtype=str)
    for path in images.loc[images["modality"] == "WSI", "path"]:
        suffix = next(s for s in SLIDE_OF_SUFFIX if path.endswith(s))
        (cohort / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_slide(SLIDE_OF_SUFFIX[suffix]), cohort / path)


def store_identities(workdir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every slide's patch store: a rewritten store gets a new inode."""
    stores = (workdir / "results/mine/patches").rglob("*.zarr")
    return {
        p.relative_to(workdir / "results/mine/patches").as_posix(): (
            p.stat().st_ino,
            p.stat().st_mtime_ns,
        )
        for p in stores
    }


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    """The section followed in a copy of the workflow; returns its folder and the commands."""
    workdir = tmp_path_factory.mktemp("byo")
    copy_workflow(workdir)
    blocks = fenced_blocks(readme_section("Bring your own cohort"))
    files = named_files(blocks)
    assert {"data/my_slides/clinical.tsv", "data/my_slides/images.tsv", "mine.yaml"} <= set(files)
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    fill_slides(workdir / "data/my_slides")
    commands = command_lines(blocks)
    assert [c[0] for c in commands] == ["mmdiag", "snakemake"], commands
    results = [run(tokens, workdir) for tokens in commands]
    return workdir, commands, results


def test_the_section_runs_as_written_on_real_slides(cohort_run):
    workdir, commands, results = cohort_run
    for tokens, result in zip(commands, results, strict=True):
        assert result.returncode == 0, f"{shlex.join(tokens)}\n{result.stdout}{result.stderr}"

    by_hand = pd.read_csv(workdir / "mine_manifest.tsv", sep="\t", dtype=str)
    assert list(by_hand["image_id"]) == ["slides/P01", "slides/P02", "slides/P03"]
    assert list(by_hand["disease"]) == ["IgAN", "MN", "IgAN"]
    workflow = pd.read_csv(workdir / "results/mine/manifest.tsv", sep="\t", dtype=str)
    pd.testing.assert_frame_equal(workflow, by_hand)

    index = pd.read_csv(workdir / "results/mine/patches/index.tsv", sep="\t")
    assert len(index) == 3 and (index["n_patches"] > 0).all()
    p03 = open_patch_store(workdir / "results/mine/patches/slides/P03.zarr")
    assert p03.attrs["mpp"] == 0.25 and p03.attrs["mpp_source"] == "override"
    p02 = open_patch_store(workdir / "results/mine/patches/slides/P02.zarr")
    assert p02.attrs["mpp_source"] == "metadata"
    assert (workdir / "results/mine/masks/tissue/slides/P01_qc.png").is_file()


def test_the_method_line_of_the_section_plans_a_training_run(cohort_run):
    """The section's `methods: {csmil: ...}` line added to mine.yaml: the DAG of
    `results/csmil/fold_all.tsv` resolves on the cohort (dry run)."""
    workdir, _, _ = cohort_run
    section = readme_section("Bring your own cohort")
    line = re.search(r"add\s+`(methods: \{csmil: \{cohort: mine[^`]*\}\})`", section)
    assert line, "the section no longer shows how to point a method at the cohort"
    trained = workdir / "mine_csmil.yaml"
    trained.write_text((workdir / "mine.yaml").read_text() + line.group(1) + "\n")
    tokens = ["snakemake", "--cores", "8", "results/csmil/fold_all.tsv"]
    result = run([*tokens, "--configfile", trained.name], workdir, dry_run=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "csmil_train" in result.stdout and "ssl_pretrain" in result.stdout


def test_only_what_changed_is_redone(cohort_run):
    """A new patient patches its slide only; a slide replaced in place remakes the manifest
    and that slide's store only; a changed `mpp` re-patches that slide only."""
    workdir, commands, _ = cohort_run
    snakemake = commands[-1]
    cohort = workdir / "data/my_slides"
    before = store_identities(workdir)

    with (cohort / "clinical.tsv").open("a") as table:
        table.write("P04\tMN\n")
    with (cohort / "images.tsv").open("a") as table:
        table.write("P04\tWSI\tslides/P04.svs\t0.5\n")  # a slide without µm/px metadata
    shutil.copyfile(real_slide(NEW_PATIENT_SLIDE), cohort / "slides/P04.svs")
    _run_ok(snakemake, workdir)
    after = store_identities(workdir)
    assert set(after) == set(before) | {"slides/P04.zarr"}
    assert {k: after[k] for k in before} == before

    stale_manifest = workdir / "results/mine/manifest.tsv"
    stale_copy = workdir / "stale_manifest.tsv"
    shutil.copyfile(stale_manifest, stale_copy)
    shutil.copyfile(real_slide(REPLACEMENT_SLIDE), cohort / "slides/P02.ndpi")
    _run_ok(snakemake, workdir)
    replaced = store_identities(workdir)
    assert [k for k in after if replaced[k] != after[k]] == ["slides/P02.zarr"]
    manifest = pd.read_csv(workdir / "results/mine/manifest.tsv", sep="\t", dtype=str)
    new_sha = sha256_file(cohort / "slides/P02.ndpi")
    assert manifest.set_index("image_id").loc["slides/P02", "sha256"] == new_sha
    p02 = open_patch_store(workdir / "results/mine/patches/slides/P02.zarr")
    assert p02.attrs["sha256"] == new_sha

    images = (cohort / "images.tsv").read_text()
    (cohort / "images.tsv").write_text(images.replace("P03.ome.tif\t0.25", "P03.ome.tif\t0.3"))
    _run_ok(snakemake, workdir)
    changed = store_identities(workdir)
    assert [k for k in replaced if changed[k] != replaced[k]] == ["slides/P03.zarr"]
    assert open_patch_store(workdir / "results/mine/patches/slides/P03.zarr").attrs["mpp"] == 0.3

    # by hand, against the manifest from before the replacement: refused, naming the slide
    out = workdir / "by_hand"
    tokens = ["mmdiag", "patch", "--manifest", str(stale_copy), "--image-id", "slides/P02"]
    tokens += ["--out", f"{out}.zarr", "--mask", f"{out}.png", "--qc", f"{out}_qc.png"]
    result = run([*tokens, "-c", "mine.yaml"], workdir)
    assert result.returncode == 1
    message = result.stdout + result.stderr
    assert "slides/P02.ndpi: content changed since the manifest was built" in message
    assert "Traceback" not in message and not Path(f"{out}.zarr").exists()


def _run_ok(tokens: list[str], workdir: Path) -> None:
    result = run(tokens, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
