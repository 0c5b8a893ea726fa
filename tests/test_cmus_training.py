"""CMUS-Net learns the demo cohort's planted signal; on permuted labels it does not."""

import copy
import subprocess

import numpy as np
import pandas as pd
import pytest

from mmdiag.config import load_config
from mmdiag.data.manifest import ManifestRules, build_manifest, read_manifest, write_manifest
from mmdiag.data.splits import make_splits, write_splits
from mmdiag.methods.cmus.fold import majority_vote, run_cmus_fold
from mmdiag.synth import write_synthetic_cohort

from .test_config import DEMO

CLASSES = ["IgAN", "MN", "LN"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo cohort, its manifest and a 3-fold split."""
    config = load_config(DEMO)
    root = tmp_path_factory.mktemp("cmus")
    synth = copy.deepcopy(config["synth"]) | {
        "n_patients": 45,
        "om_size_px": [192, 128],
        "im_size_px": [192, 128],
        "tem_size_px": 96,
        "tem_legend_px": 6,
        "tem_per_patient": [3, 4],
    }
    synth["wsi"]["n_patients"] = synth["ct"]["n_patients"] = 0
    cohort = write_synthetic_cohort(root / "raw", synth, progress=False)
    rules = ManifestRules(
        classes=tuple(CLASSES), stages=("I", "II", "III"), required_modalities=("OM", "IM", "TEM")
    )
    manifest_path = write_manifest(
        build_manifest(cohort_root=cohort, rules=rules), root / "manifest.tsv"
    )
    scheme = {"type": "kfold", "n_folds": 3, "label": "disease"}
    return config, root, manifest_path, scheme


def _mean_auc(config, root, manifest_path, scheme, name):
    settings = copy.deepcopy(config["methods"]["cmus"])
    settings["preprocess"] |= {"image_size_px": 48, "tem_legend_px": 6}
    settings["train"] |= {"epochs": 16}
    splits_path = write_splits(
        make_splits(read_manifest(manifest_path), "k3", scheme, seed=1), root / f"{name}.json"
    )
    aucs = []
    for fold in range(3):
        metrics = run_cmus_fold(
            manifest_path=manifest_path,
            splits_path=splits_path,
            fold=fold,
            variant="cmus_net",
            method_settings=settings,
            manifest_rules=config["manifest"],
            out_dir=root / name / f"fold_{fold}",
        )
        aucs.append(metrics["AUC"])
    return float(np.mean(aucs))


def test_cmus_net_learns_and_permuted_labels_do_not(demo):
    config, root, manifest_path, scheme = demo
    real = _mean_auc(config, root, manifest_path, scheme, "real")
    # permute the diseases over patients: images no longer carry their label's pattern
    manifest = read_manifest(manifest_path)
    patients = manifest.drop_duplicates("patient_id")[["patient_id", "disease"]]
    shuffled = np.random.default_rng(3).permutation(patients["disease"].to_numpy())
    relabel = dict(zip(patients["patient_id"], shuffled, strict=True))
    permuted = manifest.assign(disease=manifest["patient_id"].map(relabel))
    permuted_path = write_manifest(permuted, root / "permuted.tsv")
    chance = _mean_auc(config, root, permuted_path, scheme, "permuted")
    print(f"mean held-out AUC: real labels {real:.3f}, permuted labels {chance:.3f}")
    assert real >= 0.8, real
    assert chance <= 0.65, chance
    predictions = pd.read_csv(root / "real/fold_0/predictions.tsv", sep="\t")
    assert list(predictions.columns[:5]) == ["patient_id", "fold", "variant", "y_true", "y_pred"]


def test_majority_vote_with_ties_taking_the_mean_probability():
    def member(preds, probs):
        return pd.DataFrame(
            {
                "patient_id": ["a", "b"],
                "fold": 0,
                "y_true": [0, 1],
                "y_pred": preds,
                **{f"prob_{c}": p for c, p in zip(CLASSES, probs, strict=True)},
            }
        )

    members = [
        member([0, 0], [[0.6, 0.5], [0.3, 0.2], [0.1, 0.3]]),
        member([0, 1], [[0.7, 0.2], [0.2, 0.7], [0.1, 0.1]]),
        member([1, 2], [[0.4, 0.1], [0.5, 0.2], [0.1, 0.7]]),
    ]
    voted = majority_vote(members, CLASSES)
    assert voted["y_pred"].tolist()[0] == 0  # two of three vote 0
    # patient b: votes 0, 1, 2 tie; mean probabilities (0.267, 0.367, 0.367) -> first max, MN
    mean_b = np.mean([[0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]], axis=0)
    assert voted["y_pred"].tolist()[1] == int(np.argmax(mean_b))
    np.testing.assert_allclose(voted.loc[1, [f"prob_{c}" for c in CLASSES]], mean_b)
    with pytest.raises(ValueError, match="same patients"):
        majority_vote([members[0], members[1].assign(y_true=[1, 1])], CLASSES)


def test_a_late_votes_metrics_come_from_the_vote(tmp_path):
    """Three members vote the true class 0 while their mean probability favours class 1: the
    fold's label metrics follow the vote (ACC 1), its AUC the mean probability."""
    from mmdiag.methods.cmus.fold import run_vote_fold

    probabilities = [[0.40, 0.35, 0.25], [0.40, 0.35, 0.25], [0.05, 0.90, 0.05]]
    paths = {}
    for k, (vote, prob) in enumerate(zip([0, 0, 1], probabilities, strict=True)):
        frame = pd.DataFrame(
            {
                "patient_id": ["a", "b", "c"],
                "fold": 0,
                "variant": f"m{k}",
                "y_true": [0, 1, 2],
                "y_pred": [vote, 1, 2],
                **{f"prob_{c}": [prob[i], 0.1, 0.1] for i, c in enumerate(CLASSES)},
            }
        )
        frame.loc[1, "prob_MN"] = frame.loc[2, "prob_LN"] = 0.8
        paths[f"m{k}"] = tmp_path / f"m{k}.tsv"
        frame.to_csv(paths[f"m{k}"], sep="\t", index=False)
    settings = {"task": "disease", "variants": {"vote": {"model": "late_vote"}}}
    rules = {"classes": CLASSES}
    metrics = run_vote_fold(
        member_predictions=paths,
        fold=0,
        variant="vote",
        method_settings=settings,
        manifest_rules=rules,
        out_dir=tmp_path / "vote",
    )
    predictions = pd.read_csv(tmp_path / "vote/predictions.tsv", sep="\t")
    assert predictions["y_pred"].tolist() == [0, 1, 2]
    assert predictions.loc[0, ["prob_IgAN", "prob_MN"]].tolist() == pytest.approx(
        [0.85 / 3, 1.6 / 3]
    )
    assert metrics["ACC"] == 1.0 and metrics["F1"] == 1.0  # the arg-max of the mean says MN
    written = pd.read_csv(tmp_path / "vote/metrics.tsv", sep="\t").set_index("metric")["value"]
    assert written["ACC"] == 1.0


def test_a_cmus_cohort_trains_on_its_own_classes(demo, tmp_path):
    """A cohort's manifest_rules reach CMUS-Net as they reach every method: its classes."""
    import yaml
    from typer.testing import CliRunner

    from mmdiag.cli import app

    _, root, manifest_path, scheme = demo
    own_classes = [*CLASSES, "FSGS"]  # a fourth class that this cohort has, the global rules not
    override = tmp_path / "cohort.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "cohorts": {"demo": {"manifest_rules": {"classes": own_classes}}},
                "methods": {
                    "cmus": {
                        "preprocess": {"image_size_px": 32, "tem_legend_px": 6},
                        "train": {"epochs": 1},
                    }
                },
            }
        )
    )
    splits_path = write_splits(
        make_splits(read_manifest(manifest_path), "k3", scheme, seed=1), tmp_path / "k3.json"
    )
    config = [f"--config={path}" for path in (*DEMO, override)]
    result = CliRunner().invoke(
        app,
        ["cmus", "train", "--variant", "om", "--fold", "0", "--manifest", str(manifest_path)]
        + ["--splits", str(splits_path), "--out", str(tmp_path / "fold_0"), *config],
    )
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "fold_0/predictions.tsv", sep="\t")
    assert [c for c in predictions.columns if c.startswith("prob_")] == [
        f"prob_{name}" for name in own_classes
    ]
    resolved = yaml.safe_load((tmp_path / "fold_0/config.yaml").read_text())
    assert resolved["classes"] == own_classes


def test_the_workflow_passes_each_methods_cohort_rules(tmp_path):
    """The rules hand a method its cohort's classes (CMUS and CS-MIL alike)."""
    import json
    import re

    from .test_workflow import BIN, copy_workflow

    copy_workflow(tmp_path)
    override = tmp_path / "config" / "cohort.yaml"
    override.write_text(
        "cohorts:\n  demo:\n    manifest_rules:\n      classes: [IgAN, MN, LN, FSGS]\n"
    )
    result = subprocess.run(
        [str(BIN / "snakemake"), "results/cmus/cmus_net/fold_0/metrics.tsv"]
        + ["results/csmil/csmil/fold_0/metrics.tsv", "-n", "-p", "--configfile", str(override)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    settings = {
        command: json.loads(re.search(r"--settings-json '([^']*)'", line).group(1))
        for line in result.stdout.splitlines()
        for command in ("cmus train", "csmil train")
        if f"mmdiag {command}" in line
    }
    assert settings["cmus train"]["manifest"]["classes"] == ["IgAN", "MN", "LN", "FSGS"]
    assert settings["csmil train"]["manifest"]["classes"] == ["negative", "positive"]
