"""Configuration schema, defaults, error messages and the paper settings."""

import copy
from pathlib import Path

import pytest
import yaml

from mmdiag.config import (
    ConfigError,
    family_schema,
    load_config,
    load_schema,
    method_families,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = [ROOT / "config/config.yaml", ROOT / "config/methods/cmus.yaml"]


@pytest.fixture(scope="module")
def demo_config():
    return load_config(DEMO)


def _schema_nodes(node, path="$"):
    """Every property schema below ``node``, its dotted path and whether it needs a default."""
    required = set(node.get("required", []))
    overrides = node.get("description", "").startswith("Overrides")
    for key, child in node.get("properties", {}).items():
        needs_default = key not in required and not overrides
        yield f"{path}.{key}", child, needs_default
        yield from _schema_nodes(child, f"{path}.{key}")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _schema_nodes(extra, f"{path}.*")
    families = method_families(node) if "$defs" in node else {}
    for name, child in node.get("$defs", {}).items():
        if name == "method":
            continue  # walked inside each family's merged schema
        merged = family_schema(name, node) if name in families else child
        yield from _schema_nodes(merged, f"$defs.{name}")


def test_every_schema_key_is_described_with_a_default():
    # required keys have no default, nor do the keys of per-variant override objects
    problems = []
    for path, node, needs_default in _schema_nodes(load_schema()):
        if "description" not in node:
            problems.append(f"{path}: no description")
        if needs_default and "default" not in node and "$ref" not in node:
            problems.append(f"{path}: no default")
    assert not problems, problems


def test_demo_config_validates_and_fills_defaults(demo_config):
    cmus = demo_config["methods"]["cmus"]
    assert cmus["variants"]["cmus_net"]["modalities"] == ["OM", "IM", "TEM"]  # a default
    assert cmus["variants"]["cmus_net"]["loss_weights"] == {"OM": 0.3, "IM": 0.5, "TEM": 0.2}
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
            "allowed values: ['kfold', 'holdout', 'repeated', 'predefined']",
        ),
        (
            lambda c: c["methods"]["cmus"].update(cohort="nowhere"),
            "methods.cmus.cohort: 'nowhere' is not a cohort; allowed values: ['demo']",
        ),
        (
            lambda c: c["methods"]["cmus"].update(reference="best"),
            "methods.cmus.reference: 'best' is not a variant; allowed values: ['cmsa', 'cmus_net',",
        ),
        (
            lambda c: c["cohorts"].update(mine={"synthetic": False}),
            "cohorts.mine: give `root` (cohort folder) or `manifest` (TSV)",
        ),
        (
            lambda c: c["methods"]["cmus"]["variants"]["om"].update(model="resnet"),
            "methods.cmus.variants.om.model: 'resnet' is not allowed; "
            "allowed values: ['cmus_net', 'cmus_concat', 'mmgl', 'mdl_iia', 'cmus_mmformer', "
            "'cmus_msan', 'cmus_aggn', 'late_vote']",
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
    assert config["splits"]["schemes"][cmus["split"]]["n_folds"] == 5
    assert cmus["resources"]["gpu"] == 1
    ref = cmus["variants"]["cmus_net"]
    assert ref["encoder"] == "swin_base_patch4_window7_224"
    assert (ref["smil"], ref["smil_threshold"], ref["fusion_attention"], ref["num_heads"]) == (
        True,
        1.5,
        "cmsa",
        4,
    )
    assert ref["weighted_loss"] and ref["loss_weights"] == {"OM": 0.3, "IM": 0.5, "TEM": 0.2}
    # Table 2: all eight on/off combinations of SMIL, CMSA and WL
    table2 = cmus["tables"]["table2"]["rows"]
    combos = {
        (
            cmus["variants"][v]["smil"],
            cmus["variants"][v]["fusion_attention"] == "cmsa",
            cmus["variants"][v]["weighted_loss"],
        )
        for v in table2
    }
    assert len(table2) == 8 and len(combos) == 8
    # Table 3: the seven modality combinations
    assert {tuple(cmus["variants"][v]["modalities"]) for v in cmus["tables"]["table3"]["rows"]} == {
        ("OM",),
        ("IM",),
        ("TEM",),
        ("OM", "IM"),
        ("OM", "TEM"),
        ("IM", "TEM"),
        ("OM", "IM", "TEM"),
    }
    # Fig. 6: 36 (alpha, beta, gamma) on the 0.1 grid, each summing to 1
    grid = [v for k, v in cmus["variants"].items() if k.startswith("wl_a")]
    assert len(grid) == 36
    assert all(abs(sum(v["loss_weights"].values()) - 1) < 1e-9 for v in grid)
    # MN staging on its own labels
    assert config["methods"]["cmus_staging"]["task"] == "mn_stage"
    staging_split = config["methods"]["cmus_staging"]["split"]
    assert config["splits"]["schemes"][staging_split]["label"] == "mn_stage"


def test_vote_members_and_loss_weights_are_checked(demo_config):
    bad = copy.deepcopy(demo_config)
    bad["methods"]["cmus"]["variants"]["late_vote"]["members"] = ["om", "ghost"]
    bad["methods"]["cmus"]["variants"]["om"]["loss_weights"] = {"OM": 0.5, "IM": 0.5, "TEM": 0.5}
    with pytest.raises(ConfigError) as error:
        validate_config(bad)
    assert "late_vote.members" in str(error.value) and "['ghost']" in str(error.value)
    assert "variants.om.loss_weights: must sum to 1" in str(error.value)


def test_a_cohort_can_ask_for_the_decode_check_alone(demo_config):
    from mmdiag.config import cohort_manifest_rules

    config = copy.deepcopy(demo_config)
    config["cohorts"]["mine"] = {"root": "data/mine", "manifest_rules": {"verify": "decode"}}
    resolved = validate_config(config)
    assert cohort_manifest_rules(resolved, "mine")["verify"] == "decode"
    assert cohort_manifest_rules(resolved, "demo")["verify"] == "header"
    config["cohorts"]["mine"]["manifest_rules"]["verify"] = "pixels"
    with pytest.raises(ConfigError, match="cohorts.mine.manifest_rules.verify"):
        validate_config(config)
