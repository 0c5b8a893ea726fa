"""``python -m mmdiag``: the same command line as the ``mmdiag`` entry point."""

from mmdiag.cli import app

app(prog_name="mmdiag")
