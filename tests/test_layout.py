"""The layout that holds the methods: each family has its five files, nothing guesses a family."""

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmdiag.cli import app
from mmdiag.config import family_schema, load_config, method_families
from mmdiag.methods import method_families as packaged_families
from mmdiag.models import list_models

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = sorted(method_families())


def test_schema_families_are_the_packaged_ones():
    assert FAMILIES == packaged_families() and {"cmus", "csmil"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_its_five_files(family):
    assert (ROOT / "workflow/rules" / f"{family}.smk").is_file()
    assert (ROOT / "src/mmdiag/models" / f"{family}.py").is_file()
    for module in ("cli.py", "settings.py", "data.py", "fold.py", "figures.py"):
        assert (ROOT / "src/mmdiag/methods" / family / module).is_file(), module
    configured = yaml.safe_load((ROOT / "config/methods" / f"{family}.yaml").read_text())
    assert all(m["family"] == family for m in configured["methods"].values())
    assert list_models(family), f"no model registered for family {family}"
    result = CliRunner().invoke(app, [family, "--help"])
    assert result.exit_code == 0 and "train" in result.output


def test_shared_method_keys_are_defined_once():
    for family in FAMILIES:
        merged = family_schema(family)["properties"]
        for key in ("cohort", "split", "reference", "stats", "tables", "resources", "variants"):
            assert "description" in merged[key], (family, key)
    # a family's own default for a shared key replaces the shared default, nothing else
    assert family_schema("cmus")["properties"]["resources"]["properties"]["gpu"]["default"] == 1
    assert family_schema("csmil")["properties"]["resources"]["properties"]["gpu"]["default"] == 0


def test_no_family_is_guessed_from_a_name_prefix():
    pattern = re.compile(r"startswith\(\s*[\"'](cmus|csmil)")
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("workflow/**/*.smk"), ROOT / "Snakefile"]
    offenders = [str(p) for p in files if pattern.search(p.read_text())]
    assert offenders == []


def test_common_rules_hold_no_method_code():
    common = (ROOT / "workflow/rules/common.smk").read_text().lower()
    for family in FAMILIES:
        assert family not in common


def test_family_defaults_to_the_methods_own_name_and_is_checked(tmp_path):
    demo = [ROOT / "config/config.yaml", ROOT / "config/methods/cmus.yaml"]
    without = tmp_path / "without.yaml"
    cmus = yaml.safe_load((ROOT / "config/methods/cmus.yaml").read_text())
    del cmus["methods"]["cmus"]["family"]
    without.write_text(yaml.safe_dump(cmus))
    assert load_config([demo[0], without])["methods"]["cmus"]["family"] == "cmus"
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("methods:\n  cmus:\n    family: nosuch\n")
    with pytest.raises(ValueError, match=r"methods.cmus.family: 'nosuch' is not a method family"):
        load_config([*demo, wrong])
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("methods:\n  other: {cohort: demo, split: kfold5, variants: {a: {}}}\n")
    with pytest.raises(ValueError, match=r"methods.other: 'family' is a required property"):
        load_config([*demo, unnamed])
