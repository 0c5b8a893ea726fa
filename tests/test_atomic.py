"""Atomic writes: stale temporaries of killed runs are removed; SIGTERM cleans up its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from mmdiag.io.atomic import atomic_path, exit_cleanly_on_sigterm, remove_stale_temporaries


def _stale(folder, name: str):
    """A temporary folder as a killed run leaves it, with a half-written file inside."""
    path = folder / name
    (path / "x.zarr").mkdir(parents=True)
    (path / "x.zarr" / "chunk").write_bytes(b"half")
    return path


def test_stale_temporaries_of_the_same_output_are_removed(tmp_path):
    stale = [_stale(tmp_path, ".x.zarr.abc_12xy.tmp"), _stale(tmp_path, ".x.zarr.k9w0qz3m.tmp")]
    others = [
        _stale(tmp_path, ".x.zarr.bak.k9w0qz3m.tmp"),  # another output's (x.zarr.bak)
        _stale(tmp_path, ".y.zarr.k9w0qz3m.tmp"),
        _stale(tmp_path, "x.zarr.k9w0qz3m.tmp"),  # not hidden: not ours
    ]
    (tmp_path / ".x.zarr.file0000.tmp").write_text("a file, not a temporary folder")
    with atomic_path(tmp_path / "x.zarr", is_dir=True) as tmp:
        (tmp / "chunk").write_bytes(b"whole")
        assert not any(path.exists() for path in stale)
    assert (tmp_path / "x.zarr" / "chunk").read_bytes() == b"whole"
    assert all(path.exists() for path in others)
    assert (tmp_path / ".x.zarr.file0000.tmp").is_file()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x.zarr."))
    assert hidden == [".x.zarr.bak.k9w0qz3m.tmp", ".x.zarr.file0000.tmp"]


def test_remove_stale_temporaries_returns_what_it_removed(tmp_path):
    stale = _stale(tmp_path, ".table.tsv.a1b2c3d4.tmp")
    assert remove_stale_temporaries(tmp_path / "table.tsv") == [stale]
    assert remove_stale_temporaries(tmp_path / "table.tsv") == []
    assert remove_stale_temporaries(tmp_path / "absent" / "table.tsv") == []


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_write_removes_the_temporary(tmp_path):
    writer = textwrap.dedent(
        f"""
        import time
        from mmdiag.io.atomic import atomic_path
        with atomic_path({str(tmp_path / "out.zarr")!r}, is_dir=True) as tmp:
            (tmp / "chunk").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    popen = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert popen.stdout.readline() == "writing\n"
        assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if popen.poll() is None:
            popen.kill()
    assert list(tmp_path.iterdir()) == []


def test_exit_cleanly_on_sigterm_keeps_other_handlers_and_restores_the_default():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with exit_cleanly_on_sigterm():
        handler = signal.getsignal(signal.SIGTERM)
        assert handler is not signal.SIG_DFL
        with pytest.raises(SystemExit) as stop:
            handler(signal.SIGTERM, None)
        assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum, frame):
        """A handler someone else installed."""

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with exit_cleanly_on_sigterm():
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
