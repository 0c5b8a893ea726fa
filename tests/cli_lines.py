"""Checks of written ``mmdiag ...`` command lines (help examples, the README) against the CLI."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

import typer.main

from mmdiag.cli import app

ROOT = Path(__file__).resolve().parents[1]


def visible_commands(group=None, path=("mmdiag",)):
    """(command path, click command) of every command that ``--help`` lists."""
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if command.hidden:
            continue
        if hasattr(command, "commands"):
            yield from visible_commands(command, (*path, name))
        else:
            yield (*path, name), command


def check_command_line(line: str, settings: Mapping) -> None:
    """Raise ``AssertionError`` unless ``line`` names a command, only options it has, every
    option it requires, and (``--variant``) a variant of a configured method."""
    tokens = shlex.split(line, comments=True)
    commands = dict(visible_commands())
    path = next(
        (p for p in sorted(commands, key=len, reverse=True) if tuple(tokens[: len(p)]) == p), None
    )
    if path is None and tokens[-1:] == ["--help"]:  # the help of the program or of a group
        groups = {("mmdiag",)} | {p[:-1] for p in commands}
        assert tuple(tokens[:-1]) in groups, f"{line}: no such command group"
        return
    assert path, f"{line}: no such command"
    command = commands[path]
    options = {o for p in command.params if p.param_type_name == "option" for o in p.opts}
    given = {t.split("=")[0] for t in tokens[len(path) :] if t.startswith("-")} - {"--help"}
    assert given <= options, f"{line}: unknown options {sorted(given - options)}"
    for parameter in command.params:
        if parameter.required and parameter.param_type_name == "option":
            assert given & set(parameter.opts), f"{line}: lacks {parameter.opts[0]}"
    values = dict(zip(tokens, tokens[1:], strict=False))
    if "--variant" in values:
        method = values.get("--method", path[1])
        assert values["--variant"] in settings["methods"][method]["variants"], line
