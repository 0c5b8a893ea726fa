"""The command line: help texts and clear, file-naming errors with a non-zero exit code."""

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mmdiag.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [
    "--config",
    str(ROOT / "config/config.yaml"),
    "--config",
    str(ROOT / "config/methods/cmus.yaml"),
]
runner = CliRunner()


def test_help_lists_one_command_per_stage_and_one_group_per_method():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "manifest", "splits", "aggregate", "tables", "check-config"):
        assert command in result.output
    for family in ("cmus", "csmil"):
        assert family in result.output
    assert "csmil-train" not in result.output  # the old names are hidden aliases
    cmus = runner.invoke(app, ["cmus", "--help"])
    assert all(c in cmus.output for c in ("segment", "train", "vote", "figures"))


def test_check_config_prints_resolved_defaults():
    result = runner.invoke(app, ["check-config", *CONFIG])
    assert result.exit_code == 0, result.output
    assert "modalities:" in result.output  # a default filled in from the schema


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  cmus:\n    train:\n      epochs: -1\n")
    result = runner.invoke(app, ["check-config", *CONFIG, "--config", str(bad)])
    assert result.exit_code == 1
    assert "methods.cmus.train.epochs" in result.output


def test_manifest_error_names_the_file(tmp_path):
    result = runner.invoke(
        app, ["manifest", "--root", str(tmp_path), "--out", str(tmp_path / "m.tsv"), *CONFIG]
    )
    assert result.exit_code == 1
    assert "clinical.tsv" in result.output
    assert not (tmp_path / "m.tsv").exists()


def test_splits_rejects_an_unknown_scheme(tmp_path):
    manifest = tmp_path / "manifest.tsv"
    pd.DataFrame({"patient_id": ["a"], "disease": ["MN"]}).to_csv(manifest, sep="\t", index=False)
    result = runner.invoke(
        app,
        [
            "splits",
            "--manifest",
            str(manifest),
            "--scheme",
            "nope",
            "--out",
            str(tmp_path / "s.json"),
            *CONFIG,
        ],
    )
    assert result.exit_code == 1
    assert "unknown split scheme 'nope'" in result.output


@pytest.mark.parametrize("command", [["cmus", "train"], ["train"]], ids=["group", "old-alias"])
def test_train_rejects_an_unknown_variant(tmp_path, command):
    settings = json.dumps({"methods": {"cmus": {"variants": {"concat": {}}}}, "manifest": {}})
    result = runner.invoke(
        app,
        [
            *command,
            "--method",
            "cmus",
            "--variant",
            "nope",
            "--fold",
            "0",
            "--manifest",
            "m.tsv",
            "--splits",
            "s.json",
            "--out",
            str(tmp_path),
            "--settings-json",
            settings,
        ],
    )
    assert result.exit_code == 1
    assert "unknown variant 'nope'; configured: ['concat']" in result.output


def test_a_method_of_another_family_is_refused(tmp_path):
    settings = json.dumps({"methods": {"csmil": {"family": "csmil", "variants": {"csmil": {}}}}})
    result = runner.invoke(
        app,
        ["cmus", "vote", "--method", "csmil", "--variant", "csmil", "--fold", "0"]
        + ["--out", str(tmp_path), "--settings-json", settings, "x.tsv"],
    )
    assert result.exit_code == 1
    assert "method 'csmil' is of family 'csmil', not 'cmus'" in result.output


def test_tables_writes_the_paper_tables(tmp_path):
    rows = [
        ("cmus", variant, fold, metric, base + 0.01 * fold)
        for variant, base in (
            ("cmus_net", 0.9),
            ("none", 0.6),
            ("wl", 0.7),
            ("cmsa", 0.8),
            ("smil", 0.85),
            ("om", 0.5),
            ("im", 0.55),
            ("tem", 0.65),
            ("late_vote", 0.75),
        )
        for fold in range(5)
        for metric in ("ACC", "AUC", "PRE", "REC", "SPE", "F1")
    ]
    fold_all = tmp_path / "fold_all.tsv"
    pd.DataFrame(rows, columns=["method", "variant", "fold", "metric", "value"]).to_csv(
        fold_all, sep="\t", index=False
    )
    command = [
        "tables",
        "--method",
        "cmus",
        "--fold-all",
        str(fold_all),
        "--out-dir",
        str(tmp_path),
        *CONFIG,
    ]
    # every variant's folds differ from the reference's by a constant: the t-test is undefined
    with pytest.warns(RuntimeWarning, match="essentially constant"):
        result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    table2 = (tmp_path / "tables/table2.md").read_text()
    # mean 0.92 and sample standard deviation 0.0158 over folds 0.90..0.94, in %
    assert "| SMIL + CMSA + WL | **92.00 ± 1.58** |" in table2
    assert table2.rstrip().splitlines()[-3].endswith("Ref. |")  # the last row is the reference
    table3 = (tmp_path / "tables/table3.md").read_text()
    assert "| OM, IM, TEM (late vote) | 77.00 ± 1.58 |" in table3
    stats = pd.read_csv(tmp_path / "stats.tsv", sep="\t")
    assert set(stats["table"]) == {"table2", "table3"}
    assert stats.loc[stats["test"] == "paired_ttest", "p_value"].isna().all()
    assert table2.count("| n/a |") == 3


def test_config_files_layer_over_the_defaults_unless_told_not_to(tmp_path, monkeypatch):
    """``-c mine.yaml`` changes what it names and keeps every other default setting (the demo's,
    not the schema's paper-scale ones); ``--no-defaults`` reads the given files alone."""
    import yaml

    from mmdiag.cli_support import config_file_stack

    monkeypatch.chdir(ROOT)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"synth": {"n_patients": 9}}))
    layered = yaml.safe_load(runner.invoke(app, ["check-config", "-c", str(mine)]).output)
    assert layered["synth"]["n_patients"] == 9
    assert layered["ssl"]["backbone"] == "test_resnet"  # the demo default, not resnet50
    assert {"cmus", "csmil"} <= set(layered["methods"])

    alone = runner.invoke(
        app, ["--no-defaults", "check-config", "-c", "config/config.yaml", "-c", str(mine)]
    )
    assert alone.exit_code == 0, alone.output
    assert yaml.safe_load(alone.output)["methods"] == {}  # no config/methods/*.yaml read

    defaults = [Path("config/config.yaml"), *sorted(Path("config/methods").glob("*.yaml"))]
    # naming a default again keeps it in its place; other files come after the defaults
    assert config_file_stack([mine, Path("config/methods/cmus.yaml")]) == [*defaults, mine]
    assert config_file_stack([mine], defaults=False) == [mine]


def test_help_hides_the_internal_settings_json_option():
    result = runner.invoke(app, ["splits", "--help"])
    assert result.exit_code == 0
    assert "--settings-json" not in result.output and "--config" in result.output


def test_stage_logs_keep_pyvips_warnings_only():
    import logging

    from mmdiag.cli_support import setup_logging

    setup_logging()
    assert logging.getLogger("pyvips").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("mmdiag").getEffectiveLevel() == logging.INFO


def _example_lines(command) -> list[str]:
    """The epilog's example lines (each ends at a blank line; long ones are wrapped)."""
    paragraphs = [p.replace("\n", " ").strip() for p in (command.epilog or "").split("\n\n")]
    assert paragraphs[0] == "Examples:", command.name
    return paragraphs[1:]


def test_every_command_shows_examples_that_its_parser_accepts():
    """Each example names its own command, only options that command has, and every
    required option; the variants it names are configured."""
    from mmdiag.cli_support import default_config_files
    from mmdiag.config import load_config
    from tests.cli_lines import check_command_line, visible_commands

    settings = load_config(default_config_files(ROOT))
    commands = list(visible_commands())
    assert len(commands) >= 19
    for path, command in commands:
        lines = _example_lines(command)
        assert lines, path
        assert "Examples:" in runner.invoke(app, [*path[1:], "--help"]).output, path
        for line in lines:
            assert tuple(line.split()[: len(path)]) == path, line
            check_command_line(line, settings)


@pytest.mark.parametrize(
    "command",
    [
        ["manifest", "--root", "cohort", "--out", "m.tsv"],
        ["patch", "--manifest", "m.tsv", "--image-id", "a", "--out", "a.zarr"]
        + ["--mask", "a.png", "--qc", "a_qc.png"],
    ],
    ids=["manifest", "patch"],
)
def test_outside_a_checkout_a_missing_config_is_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, command)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: no config file: give --config, or run in a checkout holding config/config.yaml"
    )
    assert not list(tmp_path.iterdir())
