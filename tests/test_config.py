"""Configuration schema, defaults, error messages and the paper settings."""

import copy
from pathlib import Path

import pytest
import yaml

from mmdiag.config import ConfigError, load_config, load_schema, validate_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = [ROOT / "config/config.yaml", ROOT / "config/methods/cmus.yaml"]


@pytest.fixture(scope="module")
def demo_config():
    return load_config(DEMO)


def _schema_nodes(node, path="$"):
    """Every property schema below ``node`` with its dotted path."""
    for key, child in node.get("properties", {}).items():
        yield f"{path}.{key}", child
        yield from _schema_nodes(child, f"{path}.{key}")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _schema_nodes(extra, f"{path}.*")
    for name, child in node.get("$defs", {}).items():
        yield from _schema_nodes(child, f"$defs.{name}")


def test_every_schema_key_is_described_with_a_default():
    problems = []
    for path, node in _schema_nodes(load_schema()):
        if "description" not in node:
            problems.append(f"{path}: no description")
        if "default" not in node and "$ref" not in node and not path.endswith(".type"):
            if not path.endswith((".model",)):  # required keys have no default
                problems.append(f"{path}: no default")
    assert not problems, problems


def test_demo_config_validates_and_fills_defaults(demo_config):
    cmus = demo_config["methods"]["cmus"]
    assert cmus["variants"]["concat"]["modalities"] == ["OM", "IM", "TEM"]  # a default
    assert demo_config["splits"]["schemes"]["kfold5"]["n_folds"] == 5


def test_partial_config_gets_schema_defaults(demo_config):
    trimmed = copy.deepcopy(demo_config)
    del trimmed["methods"]["cmus"]["train"]["epochs"]
    del trimmed["synth"]["wsi"]
    filled = validate_config(trimmed)
    assert filled["methods"]["cmus"]["train"]["epochs"] == 60
    assert filled["synth"]["wsi"]["n_levels"] == 3


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["methods"]["cmus"].update(task="grading"),
            "methods.cmus.task: 'grading' is not allowed; allowed values: ['disease', 'mn_stage']",
        ),
        (
            lambda c: c["methods"]["cmus"]["train"].update(epoch=3),
            "methods.cmus.train: unknown key(s) ['epoch']",
        ),
        (
            lambda c: c["methods"]["cmus"]["train"].update(lr="fast"),
            "methods.cmus.train.lr: 'fast' has the wrong type",
        ),
        (
            lambda c: c["splits"]["schemes"]["kfold5"].update(type="loo"),
            "splits.schemes.kfold5.type: 'loo' is not allowed; "
            "allowed values: ['kfold', 'holdout', 'repeated']",
        ),
        (
            lambda c: c["methods"]["cmus"].update(cohort="nowhere"),
            "methods.cmus.cohort: 'nowhere' is not a cohort; allowed values: ['demo']",
        ),
        (
            lambda c: c["methods"]["cmus"].update(reference="best"),
            "methods.cmus.reference: 'best' is not a variant; "
            "allowed values: ['concat', 'im', 'om', 'tem']",
        ),
        (
            lambda c: c["cohorts"].update(mine={"synthetic": False}),
            "cohorts.mine: give `root` (cohort folder) or `manifest` (TSV)",
        ),
        (
            lambda c: c["methods"]["cmus"]["variants"]["concat"].update(model="resnet"),
            "methods.cmus.variants.concat.model: 'resnet' is not allowed; "
            "allowed values: ['cmus_concat']",
        ),
    ],
)
def test_errors_name_the_key_and_allowed_values(demo_config, edit, expected):
    bad = copy.deepcopy(demo_config)
    edit(bad)
    with pytest.raises(ConfigError) as error:
        validate_config(bad)
    assert expected in str(error.value)


def test_unreadable_config_file_is_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config([broken])
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config([listing])


def test_paper_config_holds_the_papers_settings():
    config = load_config([*DEMO, ROOT / "config/paper/cmus.yaml"])
    cmus = config["methods"]["cmus"]
    # CMUS-Net, Section 4.1-4.2
    assert (cmus["train"]["epochs"], cmus["train"]["batch_size"]) == (60, 4)
    assert cmus["train"]["lr"] == cmus["train"]["weight_decay"] == 5e-5
    assert cmus["preprocess"]["image_size_px"] == 224
    assert cmus["preprocess"]["tem_legend_px"] == 108
    assert cmus["variants"]["concat"]["encoder"] == "swin_base_patch4_window7_224"
    assert config["splits"]["schemes"][cmus["split"]]["n_folds"] == 5
    assert cmus["resources"]["gpu"] == 1
