"""A single-node SLURM cluster on this machine, for tests.

munged, slurmctld and slurmd run as plain foreground processes (no systemd, no cgroups:
``proctrack/linuxproc``, ``task/none``), with every file of theirs in one folder, and are
stopped by PID. Needs root and Debian's ``munge slurmctld slurmd slurm-client`` packages.

slurm.conf must be found at ``/etc/slurm/slurm.conf``: Snakemake's SLURM job step strips the
``SLURM_*`` variables (``SLURM_CONF`` included) before it calls ``srun``. The file there is
linked to this cluster's configuration while it runs; a file that was there before is moved
aside and put back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
INSTALL_HINT = "apt-get install munge slurmctld slurmd slurm-client"
MUNGE_USER = "munge"

SLURM_CONF = """\
ClusterName=mmdiagtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
GresTypes=gpu
{node_line} Gres=gpu:{gpus} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "a local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as root, munged as munge)"
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
    try:
        import pwd

        pwd.getpwnam(MUNGE_USER)
    except KeyError:
        return f"no {MUNGE_USER!r} user: {INSTALL_HINT}"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key (the munge package creates it; or run mungekey)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalSlurm:
    """A running single-node cluster: its folder, node, partition and daemon processes.

    The node announces ``gpus`` fake GPUs (plain files as their devices), so that jobs asking
    for GPUs are scheduled and see their allocation.
    """

    folder: Path
    node: str
    partition: str = "debug"
    gpus: int = 2
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def command(self, *arguments: str, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its standard output."""
        result = subprocess.run(
            [_which(arguments[0]) or arguments[0], *arguments[1:]],
            env=dict(os.environ, SLURM_CONF=str(self.conf)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(arguments)} failed: {result.stderr.strip()}")
        return result.stdout

    def node_state(self) -> str:
        return self.command("sinfo", "-h", "-N", "-o", "%t").strip()

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.folder.glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(parts)


def _start(name: str, command: list[str], folder: Path, **options) -> subprocess.Popen:
    output = open(folder / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **options
    )


def _start_munged(cluster: LocalSlurm) -> Path:
    """munged as the munge user, with its socket, PID, log and seed files in the folder."""
    import pwd

    munge_dir = cluster.folder / "munge"
    munge_dir.mkdir(mode=0o755)
    user = pwd.getpwnam(MUNGE_USER)
    os.chown(munge_dir, user.pw_uid, user.pw_gid)
    socket_path = munge_dir / "munge.socket"
    command = [
        _which("munged"),
        "--foreground",
        f"--socket={socket_path}",
        f"--pid-file={munge_dir / 'munged.pid'}",
        f"--log-file={munge_dir / 'munged.log'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
    ]
    cluster.processes["munged"] = _start(
        "munged", command, cluster.folder, user=user.pw_uid, group=user.pw_gid, extra_groups=[]
    )
    _wait_for(lambda: socket_path.exists(), 10, "munged socket", cluster)
    return socket_path


def _write_conf(cluster: LocalSlurm, munge_socket: Path) -> None:
    node_line = subprocess.run(
        [_which("slurmd"), "-C"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]  # NodeName=... CPUs=... RealMemory=..., as slurmd sees this host
    cluster.node = node_line.split()[0].removeprefix("NodeName=")
    for name in ("state", "spool"):
        (cluster.folder / name).mkdir()
    # slurmd drops GPUs without a device file; plain files serve (no cgroups bind them)
    for index in range(cluster.gpus):
        (cluster.folder / f"fake-gpu{index}").touch()
    gpu_files = f"{cluster.folder}/fake-gpu[0-{cluster.gpus - 1}]"
    (cluster.folder / "gres.conf").write_text(f"Name=gpu File={gpu_files}\n")
    cluster.conf.write_text(
        SLURM_CONF.format(
            node=cluster.node,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=munge_socket,
            folder=cluster.folder,
            node_line=node_line,
            partition=cluster.partition,
            gpus=cluster.gpus,
        )
    )


@contextlib.contextmanager
def _linked(system_path: Path, target: Path) -> Iterator[None]:
    """``system_path`` points to ``target`` inside the block; the old state is restored."""
    system_path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if system_path.exists() or system_path.is_symlink():
        backup = system_path.with_name(f"{system_path.name}.before-mmdiag-test-{os.getpid()}")
        system_path.rename(backup)
    system_path.symlink_to(target)
    try:
        yield
    finally:
        if system_path.is_symlink() and Path(os.readlink(system_path)) == target:
            system_path.unlink()
        if backup is not None:
            backup.rename(system_path)


@contextlib.contextmanager
def _system_conf_linked_to(folder: Path) -> Iterator[None]:
    """/etc/slurm/{slurm,gres}.conf point to the cluster's files (slurmd reads gres.conf
    beside the system slurm.conf)."""
    with _linked(SYSTEM_CONF, folder / "slurm.conf"):
        with _linked(SYSTEM_CONF.with_name("gres.conf"), folder / "gres.conf"):
            yield


def _wait_for(condition, timeout_s: float, what: str, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if condition():
                return
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode})\n{cluster.logs()}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} after {timeout_s} s\n{cluster.logs()}")


def _stop(cluster: LocalSlurm) -> None:
    """Cancel the cluster's jobs, then stop the daemons by PID (SIGTERM, then SIGKILL)."""
    if "slurmctld" in cluster.processes and cluster.processes["slurmctld"].poll() is None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            cluster.command("scancel", "--full", f"--partition={cluster.partition}")
            _wait_for(lambda: not cluster.command("squeue", "-h", "-t", "R,CG"), 15, "", cluster)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for process in cluster.processes.values():
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def local_slurm(*, start_timeout_s: float = 60) -> Iterator[LocalSlurm]:
    """Start munged, slurmctld and slurmd; yield the cluster once its node is idle; stop them.

    The daemons' files live in a fresh folder under the system's temporary folder (munged
    refuses folders that are not its own); it is removed at the end.
    """
    reason = missing_requirements()
    if reason:
        raise RuntimeError(reason)
    folder = Path(tempfile.mkdtemp(prefix="mmdiag-slurm-"))
    folder.chmod(0o755)
    cluster = LocalSlurm(folder=folder, node="")
    try:
        munge_socket = _start_munged(cluster)
        _write_conf(cluster, munge_socket)
        with _system_conf_linked_to(cluster.folder):
            cluster.processes["slurmctld"] = _start(
                "slurmctld", [_which("slurmctld"), "-D", "-f", str(cluster.conf)], folder
            )
            cluster.processes["slurmd"] = _start(
                "slurmd",
                [_which("slurmd"), "-D", "-N", cluster.node, "-f", str(cluster.conf)],
                folder,
            )
            try:
                _wait_for(
                    lambda: cluster.node_state() == "idle", start_timeout_s, "idle node", cluster
                )
                yield cluster
            finally:
                _stop(cluster)
    finally:
        _stop(cluster)
        shutil.rmtree(folder, ignore_errors=True)
