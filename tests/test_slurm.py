"""The SLURM profile against a real SLURM: a single-node cluster started on this machine.

A small real part of the DAG (synthetic cohort, manifest, splits, OM segmentation and a
CMUS training fold) runs through the SLURM executor, and its results must be identical to a
local run of the same targets; another fold, given two (fake) GPUs, trains with two
processes; a failing job fails the run. Needs root and the munge/SLURM packages; skipped otherwise.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open

from .slurm.cluster import local_slurm, missing_requirements
from .test_workflow import TINY_CONFIG, copy_workflow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROFILE = ROOT / "tests/slurm/profile"
TARGETS = ["results/cmus/cmus_net/fold_0/metrics.tsv"]
SLURM_OPTIONS = ["--workflow-profile", str(PROFILE), "--configfile", "tiny.yaml"]
TIMEOUT_S = 240  # the SLURM run takes about a minute; a lost job would otherwise hang it


def _why_skip() -> str | None:
    reason = missing_requirements()
    if reason is None and shutil.which("snakemake", path=str(BIN)) is None:
        reason = "snakemake is not installed beside this Python"
    if reason is None:
        try:
            import snakemake_executor_plugin_slurm  # noqa: F401
        except ImportError:
            reason = "the SLURM executor plugin is missing: pip install -e '.[slurm]'"
    return reason


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip())),
]


@pytest.fixture(scope="module")
def cluster():
    with local_slurm() as running:
        yield running


def _workflow_copy(folder: Path) -> Path:
    folder.mkdir()
    copy_workflow(folder)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return folder


def _snakemake(arguments: list[str], workdir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run Snakemake with a hard timeout (its whole process group is killed on expiry)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN / "snakemake"), *arguments],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"snakemake did not finish within {TIMEOUT_S} s:\n{output[-5000:]}")
    elapsed = time.perf_counter() - started
    return subprocess.CompletedProcess(process.args, process.returncode, output, ""), elapsed


def _result_files(workdir: Path) -> dict[str, Path]:
    """Every file under results/, by relative path (time and memory benchmarks excluded)."""
    results = workdir / "results"
    return {
        str(path.relative_to(results)): path
        for path in sorted(results.rglob("*"))
        if path.is_file() and path.relative_to(results).parts[0] != "benchmarks"
    }


def _checkpoint(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as checkpoint:
        return checkpoint.metadata(), {k: checkpoint.get_tensor(k) for k in checkpoint.keys()}


def _assert_same_results(local: Path, slurm: Path) -> None:
    """Byte for byte, except the wall-time column of train logs and the order of safetensors
    metadata keys (written from a hash map); checkpoint tensors must be bit-identical."""
    local_files, slurm_files = _result_files(local), _result_files(slurm)
    assert local_files.keys() == slurm_files.keys()
    for name, path in local_files.items():
        if path.name == "train_log.tsv":
            frames = [
                pd.read_csv(p, sep="\t").drop(columns="seconds") for p in (path, slurm_files[name])
            ]
            pd.testing.assert_frame_equal(*frames, check_exact=True)
        elif path.suffix == ".safetensors":
            (meta, tensors), (slurm_meta, slurm_tensors) = map(
                _checkpoint, (path, slurm_files[name])
            )
            assert meta == slurm_meta and tensors.keys() == slurm_tensors.keys(), name
            assert all(torch.equal(tensors[k], slurm_tensors[k]) for k in tensors), name
        else:
            assert path.read_bytes() == slurm_files[name].read_bytes(), name


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The targets run locally, then through SLURM, in the same folder (results record
    absolute paths and their checksums); the local results are moved aside in between."""
    root = tmp_path_factory.mktemp("runs")
    on_slurm, local = root / "work", root / "local"
    _workflow_copy(on_slurm)
    result, local_s = _snakemake([*TARGETS, "--cores", "2", "--configfile", "tiny.yaml"], on_slurm)
    assert result.returncode == 0, result.stdout[-5000:]
    on_slurm.rename(local)

    _workflow_copy(on_slurm)
    result, slurm_s = _snakemake([*TARGETS, *SLURM_OPTIONS], on_slurm)
    assert result.returncode == 0, result.stdout[-5000:] + cluster.logs()
    print(f"\n{len(_job_ids(result))} jobs: local {local_s:.1f} s, through SLURM {slurm_s:.1f} s")
    return local, on_slurm, result


def _job_ids(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", result.stdout)


def _job_states(cluster, ids: list[str]) -> list[str]:
    listing = cluster.command("squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%T")
    return listing.split()


def test_dag_part_through_slurm_equals_local_run(cluster, runs):
    local, on_slurm, result = runs
    ids = _job_ids(result)
    assert len(ids) == 5, result.stdout[-3000:]  # synth, manifest, splits, segment, a fold
    assert _job_states(cluster, ids) == ["COMPLETED"] * 5
    _assert_same_results(local, on_slurm)
    trained = yaml.safe_load((on_slurm / "results/cmus/cmus_net/fold_0/config.yaml").read_text())
    assert trained["n_processes"] == 1
    # the profile's report-after-run: the report of this partial run, after it
    report = on_slurm / "report.html"
    assert report.is_file() and report.stat().st_mtime >= max(
        p.stat().st_mtime for p in (on_slurm / "results").rglob("metrics.tsv")
    )


def test_job_given_two_gpus_trains_with_two_processes(cluster, runs):
    """The GPU count of a job's resources reaches sbatch (--gpus) and torchrun (processes)."""
    _, on_slurm, _ = runs
    target = "results/cmus/om/fold_0/metrics.tsv"
    gpus = ["--set-resources", "cmus_train_fold:gpu=2", "cmus_train_fold:cpus_per_gpu=1"]
    result, _ = _snakemake([target, *SLURM_OPTIONS, *gpus], on_slurm)
    assert result.returncode == 0, result.stdout[-5000:] + cluster.logs()
    (job_id,) = _job_ids(result)
    job = cluster.command("scontrol", "show", "job", job_id)
    assert "TresPerJob=gres:gpu:2" in job and "JobState=COMPLETED" in job, job
    fold = on_slurm / "results/cmus/om/fold_0"
    assert yaml.safe_load((fold / "config.yaml").read_text())["n_processes"] == 2
    log = (on_slurm / "logs/cmus_train_fold/cmus_om_fold0.log").read_text()
    assert "2 process(es)" in log
    assert len(pd.read_csv(fold / "predictions.tsv", sep="\t")) == 4  # 12 patients, 3 folds


def test_failed_slurm_job_fails_the_run(cluster, tmp_path):
    """Without slurmdbd the status comes from squeue: a failed job must still be seen."""
    (tmp_path / "Snakefile").write_text(
        'rule fail:\n    output:\n        "never.txt",\n    shell:\n'
        '        "echo failing on purpose; exit 3"\n'
    )
    result, _ = _snakemake(["never.txt", "--workflow-profile", str(PROFILE)], tmp_path)
    assert result.returncode != 0
    assert "Error in rule fail" in result.stdout, result.stdout[-3000:]
    assert not (tmp_path / "never.txt").exists()
