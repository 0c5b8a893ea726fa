"""``python -m mmdiag``: the same command line as the ``mmdiag`` entry point."""

from mmdiag.cli import app

if __name__ == "__main__":
    app(prog_name="mmdiag")
