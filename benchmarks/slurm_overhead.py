"""SLURM executor overhead: a demo DAG part run locally, then through SLURM on this machine.

Both runs use a fresh copy of the workflow in the same folder (the local results are moved
aside in between) and the same parallelism (``--jobs`` jobs at a time): locally with
``snakemake --cores``, then through the test profile (``tests/slurm/profile``) on a
single-node SLURM cluster that the script starts and stops (``tests/slurm/cluster.py``; needs
root and Debian's munge and SLURM packages). It prints both wall times, their ratio, the extra
wall time per job, and where a SLURM job's time goes: queued, Snakemake starting inside the
job, the rule's command, the job ending, and the main Snakemake noticing (status polling).

    python benchmarks/slurm_overhead.py [--jobs 2] [--configfile FILE] [TARGET ...]

Without targets, the demo's CMUS-Net part: results/cmus/fold_all.tsv, tables and figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.slurm.cluster import LocalSlurm, local_slurm  # noqa: E402

BIN = Path(sys.executable).parent
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "envs")
DEMO_TARGETS = ["results/cmus/fold_all.tsv", "results/cmus/tables", "results/cmus/figures"]
PROFILE = ROOT / "tests/slurm/profile"


def workflow_copy(folder: Path, configfile: Path | None) -> None:
    """A fresh copy of the workflow (and the extra config file) in ``folder``."""
    folder.mkdir()
    for name in WORKFLOW_FILES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, folder / name)
    if configfile is not None:
        shutil.copy(configfile, folder / "extra.yaml")


def snakemake(arguments: list[str], workdir: Path) -> tuple[str, float]:
    """Run Snakemake; its output and wall time in seconds (raises on failure)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "snakemake"), *arguments],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"snakemake failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr, elapsed


STAMP = r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]"


def _stamp(text: str) -> datetime:
    return datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")


def submitted_jobs(output: str) -> dict[str, str]:
    """SLURM job id -> Snakemake job id, from the main Snakemake output."""
    found = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)
    return {slurm_id: job_id for job_id, slurm_id in found}


def finished_at(output: str) -> dict[str, datetime]:
    """Snakemake job id -> when the main Snakemake saw it finish (to the second)."""
    found = re.findall(STAMP + r"\nFinished jobid: (\d+)", output)
    return {job: _stamp(when) for when, job in found}


def command_window(job_log: str) -> tuple[datetime, datetime]:
    """When the rule's command started and finished inside a SLURM job (its log)."""
    starts = re.findall(STAMP + r"\nlocal(?:rule|checkpoint) ", job_log)
    ends = re.findall(STAMP + r"\nFinished jobid", job_log)
    return _stamp(starts[-1]), _stamp(ends[0])


def job_phases(cluster: LocalSlurm, slurm_id: str, workdir: Path, seen: datetime) -> dict:
    """Seconds of a SLURM job's phases: queued, start-up inside the job before the command,
    the command, the rest of the job, and until the main Snakemake saw it finish."""
    job = cluster.command("scontrol", "show", "job", slurm_id)
    fields = dict(re.findall(r"(\w+)=(\S+)", job))
    submit, start, end = (
        datetime.fromisoformat(fields[k]) for k in ("SubmitTime", "StartTime", "EndTime")
    )
    (log,) = (workdir / ".snakemake/slurm_logs").rglob(f"{slurm_id}.log")
    command_start, command_end = command_window(log.read_text())
    return {
        "queued_s": (start - submit).total_seconds(),
        "job_start_up_s": (command_start - start).total_seconds(),
        "command_s": (command_end - command_start).total_seconds(),
        "job_wind_down_s": (end - command_end).total_seconds(),
        "noticed_after_s": (seen - end).total_seconds(),
        "total_s": (seen - submit).total_seconds(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=DEMO_TARGETS)
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time, both runs")
    parser.add_argument("--configfile", type=Path, help="an extra config file for both runs")
    args = parser.parse_args()
    config = ["--configfile", "extra.yaml"] if args.configfile else []

    with tempfile.TemporaryDirectory() as folder, local_slurm() as cluster:
        work, local = Path(folder) / "work", Path(folder) / "local"
        workflow_copy(work, args.configfile)
        _, local_s = snakemake([*args.targets, "--cores", str(args.jobs), *config], work)
        work.rename(local)

        workflow_copy(work, args.configfile)
        profile = ["--workflow-profile", str(PROFILE), "--jobs", str(args.jobs), *config]
        output, slurm_s = snakemake([*args.targets, *profile, "--slurm-keep-successful-logs"], work)
        seen = finished_at(output)
        phases = pd.DataFrame(
            [
                job_phases(cluster, slurm_id, work, seen[job_id])
                for slurm_id, job_id in submitted_jobs(output).items()
            ]
        )

    n_jobs = len(phases)
    overhead = phases["total_s"] - phases["command_s"]
    print(f"targets: {' '.join(args.targets)}; {n_jobs} jobs, {args.jobs} at a time")
    print(f"local:         {local_s:8.1f} s")
    print(f"through SLURM: {slurm_s:8.1f} s")
    print(f"ratio SLURM / local: {slurm_s / local_s:.2f}")
    print(f"extra wall time per job: {(slurm_s - local_s) / n_jobs:.1f} s")
    print("per SLURM job, mean seconds (timestamps to the second):")
    print(phases.mean().round(1).to_string())
    print(
        f"overhead per job (all but the command): {overhead.mean():.1f} s mean, "
        f"{overhead.median():.1f} s median"
    )


if __name__ == "__main__":
    main()
