"""What every command of the ``mmdiag`` command line shares: option types, settings, errors.

Settings come from the YAML config files (validated against ``config/schema.yaml``): the
defaults ``config/config.yaml`` and ``config/methods/*.yaml`` of the current folder, with each
``--config`` file layered on top, as Snakemake layers ``--configfile`` over the workflow's
config (``mmdiag --no-defaults ...`` reads the ``--config`` files alone). When Snakemake calls,
they come from ``--settings-json``: the already validated section(s) the stage needs. Errors
end the command with exit code 1 and one line that names the file, key or value at fault.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Annotated, NoReturn

import typer

ConfigFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file(s) layered in order over the defaults, config/config.yaml and "
        "config/methods/*.yaml of the current folder (mmdiag --no-defaults: these files alone).",
    ),
]
SettingsJson = Annotated[
    str | None,
    typer.Option(
        help="Validated settings as JSON (how Snakemake passes them); replaces --config.",
        hidden=True,  # internal: the workflow's rules pass it; people give --config
    ),
]
ManifestPath = Annotated[Path, typer.Option("--manifest", help="Manifest TSV.")]
SplitsPath = Annotated[Path, typer.Option("--splits", help="Split JSON.")]
FoldIndex = Annotated[int, typer.Option("--fold", help="Fold index in the split file.")]
VariantName = Annotated[str, typer.Option(help="Variant (a row of the method's tables).")]


def examples(*lines: str) -> str:
    """A command's ``--help`` epilog: example command lines, one per line.

    Typer joins an epilog's single line breaks and keeps the double ones.
    """
    return "\n\n".join(("Examples:", *lines))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with code 1."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code=1)


def reports_errors(*errors: type[Exception]) -> Callable:
    """Decorator: turn the given exceptions (default ``ValueError``) into :func:`fail`."""
    caught = errors or (ValueError,)

    def decorate(command: Callable) -> Callable:
        @wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except caught as error:
                fail(str(error))

        return run

    return decorate


#: Whether ``--config`` files are layered over the default config files (``--no-defaults``).
_LAYER_OVER_DEFAULTS = {"on": True}


def layer_over_defaults(enabled: bool) -> None:
    """Set by the root command's ``--defaults/--no-defaults`` option."""
    _LAYER_OVER_DEFAULTS["on"] = enabled


def default_config_files(folder: Path = Path(".")) -> list[Path]:
    """``config/config.yaml`` and ``config/methods/*.yaml`` (name order) under ``folder``."""
    main = folder / "config/config.yaml"
    methods = sorted((folder / "config/methods").glob("*.yaml"))
    return ([main] if main.is_file() else []) + methods


def config_file_stack(config_files: list[Path] | None, *, defaults: bool = True) -> list[Path]:
    """The files to merge, in order: the defaults (unless ``defaults`` is off), then each given
    file that is not one of them (so naming a default again does not move it to the end)."""
    stack = default_config_files() if defaults or not config_files else []
    seen = {path.resolve() for path in stack}
    for path in config_files or []:
        if path.resolve() not in seen:
            stack.append(path)
            seen.add(path.resolve())
    return stack


def load_settings(config_files: list[Path] | None, settings_json: str | None) -> dict:
    """The validated configuration, from JSON (Snakemake) or from YAML files (by hand)."""
    from mmdiag.config import ConfigError, load_config

    if settings_json:
        return json.loads(settings_json)
    stack = config_file_stack(config_files, defaults=_LAYER_OVER_DEFAULTS["on"])
    if not stack:
        fail("no config file: give --config, or run in a checkout holding config/config.yaml")
    try:
        return load_config(stack)
    except ConfigError as error:
        fail(str(error))


def method_settings(settings: Mapping, method: str, family: str | None = None) -> dict:
    """A configured method's settings; a clear error naming the configured ones, or the
    method's family when it is not ``family``."""
    methods = settings["methods"]
    if method not in methods:
        fail(f"unknown method {method!r}; configured: {sorted(methods)}")
    found = methods[method].get("family", family)
    if family is not None and found != family:
        fail(f"method {method!r} is of family {found!r}, not {family!r}")
    return methods[method]


def variant_settings(
    settings: Mapping, method: str, variant: str, family: str
) -> tuple[dict, dict]:
    """A method's settings and one of its variants', or a clear error naming the configured ones."""
    chosen = method_settings(settings, method, family)
    if variant not in chosen["variants"]:
        fail(f"unknown variant {variant!r}; configured: {sorted(chosen['variants'])}")
    return chosen, chosen["variants"][variant]


def method_manifest_rules(settings: Mapping, method: str) -> dict:
    """The manifest rules of a method's cohort: the global rules with the cohort's overrides.

    From YAML files the cohort's ``manifest_rules`` apply here; Snakemake passes the rules
    already merged as ``manifest`` (and no cohorts), so both paths give the same classes.
    """
    from mmdiag.config import cohort_manifest_rules

    return cohort_manifest_rules(settings, settings["methods"][method]["cohort"])


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch (0 keeps torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def setup_logging() -> None:
    """INFO-level logging of every stage to stderr (the rule's log file)."""
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # libvips logs every loader call at INFO; only its warnings belong in a stage's log
    logging.getLogger("pyvips").setLevel(logging.WARNING)
