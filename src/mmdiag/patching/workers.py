"""Lifetime of the patching engine's worker processes: they end when their parent ends.

A spawned worker that outlives its parent (``kill -9`` of ``mmdiag patch``, a job cancelled by
Snakemake or SLURM) is re-parented to PID 1 and keeps decoding blocks into a shared buffer
nobody reads, holding memory and CPU. Three things prevent it:

- on Linux, each worker asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and exits at once if the parent is already gone;
- elsewhere, a daemon thread in each worker polls the parent and exits when it has gone;
- in the parent, :func:`stop_workers` kills the pool's processes when extraction ends early
  (an error, or ``SIGTERM`` turned into ``SystemExit`` by
  :func:`mmdiag.io.atomic.exit_cleanly_on_sigterm`), instead of waiting for queued blocks.

The kernel sends the death signal when the *thread* that started the worker ends, so a pool must
be created and shut down by the same thread (as :mod:`mmdiag.patching.engine` does).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["end_with_parent", "stop_workers"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCHDOG_INTERVAL_S = 0.5


def end_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when the process ``parent_pid`` ends.

    Called first in a worker's initializer, with the parent's pid taken before the worker was
    started: if the parent died in between (the worker already has another parent), the
    worker exits at once rather than work for nobody.
    """
    if not _set_parent_death_signal():
        start_watchdog(parent_pid)
    if not _parent_alive(parent_pid):
        os._exit(1)


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbols (static builds, unusual sandboxes)
        return False


def _parent_alive(parent_pid: int) -> bool:
    """Whether the process that started this one still runs.

    On POSIX an orphan is re-parented, so its parent pid changes; Windows does not re-parent,
    so there the parent's handle, which multiprocessing keeps, tells.
    """
    if os.name == "posix":
        return os.getppid() == parent_pid
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def start_watchdog(parent_pid: int, interval_s: float = _WATCHDOG_INTERVAL_S) -> threading.Thread:
    """Start a daemon thread that ends this process once ``parent_pid`` is no longer its parent.

    The fallback where the kernel offers no parent-death signal; a worker outlives its parent
    by at most ``interval_s``.
    """

    def watch() -> None:
        while _parent_alive(parent_pid):
            time.sleep(interval_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="mmdiag-parent-watchdog", daemon=True)
    thread.start()
    return thread


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes now and drop its queued work.

    ``ProcessPoolExecutor.shutdown`` waits for every running task; when the results are no
    longer wanted (an error elsewhere, a termination request), that only delays the exit.
    """
    kill = getattr(pool, "kill_workers", None)  # Python 3.14
    if kill is not None:
        kill()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
