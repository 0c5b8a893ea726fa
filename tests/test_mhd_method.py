"""MHD-Net as a method: settings, the per-fold trainers on a real (tiny) cohort of NIfTI CTs
and patched SVS slides, the leakage guards of the deployed student, and the figures."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmdiag.cli_support import default_config_files
from mmdiag.config import cohort_manifest_rules, load_config, validate_config
from mmdiag.data.manifest import read_manifest, write_manifest
from mmdiag.data.splits import make_splits, write_splits
from mmdiag.io import read_tsv
from mmdiag.methods.mhd import figures as mhd_figures
from mmdiag.methods.mhd.data import collate_tensors, fold_datasets, load_patients
from mmdiag.methods.mhd.fold import METRICS, predict_types, run_mhd_fold
from mmdiag.methods.mhd.settings import build_model, config_problems, model_arguments
from mmdiag.models.mhd import MHDTeacher, mhd_student, read_memory, tiny_example
from mmdiag.models.shfm import ConcatFusion
from mmdiag.models.type_memory import TypeMemory
from mmdiag.reporting import figures
from mmdiag.synth.tet import WHO_TYPES, TetSettings
from mmdiag.training.loop import TrainSettings, train_model
from tests.tet_cohort import write_patched_tet_cohort

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return load_config(default_config_files(ROOT))


def _method(epochs: int = 2) -> dict:
    settings = copy.deepcopy(_config()["methods"]["mhd"])
    settings["train"]["epochs"] = epochs
    return settings


# --------------------------------------------------------------------------- settings


def test_a_student_is_built_around_its_teachers_network():
    settings = _method()
    settings["variants"]["concat_student"] = {
        "model": "student",
        "teacher": "teacher_concat",
        "options": {"alpha_kl": 0.2},
        "train": {},
    }
    model = build_model(settings, "concat_student", n_types=8)
    assert all(isinstance(f, ConcatFusion) for f in model.teacher.fuse)
    assert model.alpha_kl == 0.2 and model.alpha_mse == 0.1
    arguments = model_arguments(settings, "concat_student", 8)
    assert arguments["widths"] == [8, 16, 32, 64] and arguments["frames"] == 8
    # keep_other false in the demo: 8 outputs; with "other" a ninth
    assert arguments["n_classes"] == 8
    settings["sequences"]["keep_other"] = True
    assert model_arguments(settings, "concat_student", 8)["n_classes"] == 9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, s: v["mhd_net"].update(teacher="ct_resnet18"), "is not a teacher variant"),
        (lambda v, s: v["teacher"].update(teacher="teacher"), "only a student"),
        (lambda v, s: v["teacher"]["options"].update(nosuch=1), r"\['nosuch'\] are not options"),
        (lambda v, s: s["network"].update(widths=[8, 8, 32, 64]), "c_s \\* t_s must be equal"),
        (lambda v, s: s["figures"]["roc"].update(rows=["mhd_net"]), "figures.roc.rows"),
        (lambda v, s: s["figures"].update(confusion=["nosuch"]), "figures.confusion"),
        (lambda v, s: s.update(lesions="table"), "lesion_table: lesions: table needs"),
    ],
)
def test_config_problems_name_the_key(change, message):
    config = _config()
    settings = config["methods"]["mhd"]
    change(settings["variants"], settings)
    problems = list(config_problems("mhd", settings, config))
    assert any(pytest.importorskip("re").search(message, p) for p in problems), problems


def test_demo_config_validates_with_no_problem():
    config = _config()
    validate_config(config)
    assert list(config_problems("mhd", config["methods"]["mhd"], config)) == []


# --------------------------------------------------------------------------- models


def test_memory_reading_ignores_the_other_logit():
    """A head with the extra "other" output: z_R' is the softmax over the K type logits."""
    arguments, _ = tiny_example()
    teacher = MHDTeacher(3, frames=8, widths=arguments["widths"], kernel_sizes=(3, 3, 3))
    memory = TypeMemory(32, (16, 16, 4), num_types=2)
    ct = torch.randn(2, 1, 8, 32, 32)
    weights, maps = read_memory(
        teacher.radiology, teacher.heads["radiology"], memory, ct, (8, 16, 32)
    )
    with torch.no_grad():
        logits = teacher(ct, torch.zeros(2, 3, 8, 32, 32))["logits_radiology"]
    torch.testing.assert_close(weights, torch.softmax(logits[:, :2], dim=1))
    assert [m.shape[1:] for m in maps] == [(8, 4, 8, 8), (16, 2, 4, 4), (32, 1, 2, 2)]


def test_other_sequences_train_but_never_update_a_bank():
    memory = TypeMemory(4, (4, 1), num_types=2).train()
    before = [s.items.clone() for s in memory.stages]
    maps = [torch.randn(1, 2, 2, 4, 4), torch.randn(1, 4, 1, 1, 1)]
    memory.update(maps, torch.tensor([2]), torch.tensor([False]))  # class K, not a tumour
    assert all(torch.equal(b, s.items) for b, s in zip(before, memory.stages, strict=True))
    with pytest.raises(ValueError, match="tumour labels"):
        memory.update(maps, torch.tensor([2]), torch.tensor([True]))


def test_a_student_without_memory_never_reads_it():
    arguments, batch = tiny_example()
    distiller = mhd_student(**arguments, memory=False).eval()
    reference = distiller(batch)
    for stage in distiller.memory.stages:
        stage.items.normal_()
    torch.testing.assert_close(distiller(batch), reference, rtol=0, atol=0)
    features = distiller.forward_student(batch["ct"])["features_fusion"]
    assert [f.shape[1] for f in features] == [8, 16, 32]  # the stage outputs f_R'^s
    assert len(distiller.student.fuse) == 0


def test_the_training_loop_tells_the_samples_each_epoch(tmp_path):
    class Samples(list):
        epochs: list[int] = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    samples = Samples({"x": torch.randn(3), "label": torch.tensor(i % 2)} for i in range(4))

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, batch):
            return self.layer(batch["x"])

    def collate(items, generators=None):
        return {k: torch.stack([i[k] for i in items]) for k in ("x", "label")}

    settings = TrainSettings(epochs=3, batch_size=2, lr=0.1, lr_min=0.0, weight_decay=0.0)
    torch.manual_seed(0)
    train_model(Linear(), samples, collate, settings, resume_dir=tmp_path / "state")
    assert Samples.epochs == [1, 2, 3]


# --------------------------------------------------------------------------- a tiny cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 patients (two per type), one patched SVS each, a stratified 50:50 holdout."""
    root = tmp_path_factory.mktemp("mhd_cohort")
    settings = TetSettings(n_patients=16, seed=3, ct_shape_vox=(48, 48, 40), slides_per_patient=1)
    config = _config()
    rules = cohort_manifest_rules(config, "tet_demo")
    manifest = write_patched_tet_cohort(root, settings, rules)
    scheme = {"type": "holdout", "fractions": [0.5, 0.0, 0.5], "label": "who_type"}
    write_splits(make_splits(manifest, "h", scheme, seed=1), root / "splits.json")
    return root, rules


def _fold(cohort, variant, out, *, manifest=None, patches=None, settings=None, teacher=None):
    root, rules = cohort
    return run_mhd_fold(
        manifest_path=manifest or root / "manifest.tsv",
        splits_path=root / "splits.json",
        patches_dir=patches or root / "patches",
        fold=0,
        variant=variant,
        method_settings=settings or _method(),
        manifest_rules=rules,
        out_dir=out,
        teacher_checkpoint=teacher,
    )


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("mhd_results")
    _fold(cohort, "teacher", out / "teacher/fold_0")
    teacher = out / "teacher/fold_0/model.safetensors"
    _fold(cohort, "mhd_net", out / "mhd_net/fold_0", teacher=teacher)
    _fold(cohort, "ct_resnet18", out / "ct_resnet18/fold_0")
    return out


def test_fold_folders_hold_one_prediction_per_test_tumour_sequence(cohort, trained):
    root, _ = cohort
    split = pd.read_json(root / "splits.json", typ="series")["folds"][0]
    settings = _method()
    patients = load_patients(root / "manifest.tsv", root / "patches", settings, "who_type")
    test = fold_datasets(patients, split, list(WHO_TYPES), settings, seed=0, wsi_parts=())["test"]
    assert all(s.tumour for s in test.samples) and len(test) >= len(split["test"])
    for variant in ("teacher", "mhd_net", "ct_resnet18"):
        folder = trained / variant / "fold_0"
        predictions = read_tsv(folder / "predictions.tsv")
        assert list(predictions["sequence"]) == [s.unit_id for s in test.samples]
        assert set(predictions["patient_id"]) <= set(split["test"])
        assert predictions["sequence"].is_unique
        assert predictions["sequence"].str.match(r"TET\d+@\d+-\d+").all()
        prob = predictions[[f"prob_{t}" for t in WHO_TYPES]].to_numpy()
        np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-6)
        assert (predictions["y_pred"] == prob.argmax(axis=1)).all()
        metrics = read_tsv(folder / "metrics.tsv")
        assert list(metrics["metric"]) == list(METRICS)
        assert len(read_tsv(folder / "train_log.tsv")) == 2
        assert not (trained / variant / ".fold_0.resume").exists()
    # the teacher's branches: three rows per sequence, its prediction is the fusion branch's
    branches = read_tsv(trained / "teacher/fold_0/branches.tsv")
    teacher = read_tsv(trained / "teacher/fold_0/predictions.tsv")
    assert branches["branch"].value_counts().to_dict() == {
        b: len(teacher) for b in ("radiology", "pathology", "fusion")
    }
    fusion = branches[branches["branch"] == "fusion"].reset_index(drop=True)
    columns = [f"prob_{t}" for t in WHO_TYPES]
    np.testing.assert_allclose(fusion[columns].to_numpy(), teacher[columns].to_numpy())


def test_the_students_checkpoint_is_the_deployed_model_with_the_teachers_memory(trained):
    teacher = load_file(trained / "teacher/fold_0/model.safetensors")
    student = load_file(trained / "mhd_net/fold_0/model.safetensors")
    assert {k.split(".")[0] for k in student} == {
        "radiology",
        "radiology_head",
        "memory",
        "student",
    }
    for key in (k for k in teacher if k.startswith("memory.")):
        assert torch.equal(student[key], teacher[key])  # frozen banks, bit for bit
    for key in (k for k in teacher if k.startswith("teacher.radiology.")):
        assert torch.equal(student[key.removeprefix("teacher.")], teacher[key])
    # the teacher's memory was written by training: not its seeded initial state
    fresh = TypeMemory(32, (16, 16, 4), num_types=8)
    assert not torch.equal(teacher["memory.stages.0.items"], fresh.stages[0].items)


def test_test_labels_and_test_slides_never_reach_the_student(cohort, trained, tmp_path):
    """Permuted test labels and deleted test slides and patch stores: the same predictions."""
    manifest, patches = _blinded_inputs(cohort, tmp_path)
    labels = read_manifest(manifest)["who_type"]
    assert (labels != read_manifest(cohort[0] / "manifest.tsv")["who_type"]).any()
    teacher = trained / "teacher/fold_0/model.safetensors"
    _fold(cohort, "mhd_net", tmp_path / "out", manifest=manifest, patches=patches, teacher=teacher)
    columns = [f"prob_{t}" for t in WHO_TYPES]
    expected = read_tsv(trained / "mhd_net/fold_0/predictions.tsv")
    got = read_tsv(tmp_path / "out/predictions.tsv")
    np.testing.assert_array_equal(got[columns].to_numpy(), expected[columns].to_numpy())
    assert (got["sequence"] == expected["sequence"]).all()


#: The comparison methods as variants (:mod:`mmdiag.models.mhd_baselines`).
BASELINES = {
    "mmformer": {"model": "mmformer", "options": {"num_heads": 2}},
    "moddrop": {"model": "moddrop", "options": {}},
    "sckd": {"model": "sckd", "teacher": "teacher", "options": {}},
    "pcct": {"model": "pcct", "options": {}},
}


def _blinded_inputs(cohort, folder: Path) -> tuple[Path, Path]:
    """A copy of the cohort's manifest with the test patients' types rolled and a copy of its
    patch stores without the test patients' slides."""
    root, _ = cohort
    split = pd.read_json(root / "splits.json", typ="series")["folds"][0]
    manifest = read_manifest(root / "manifest.tsv")
    test = manifest["patient_id"].isin(split["test"])
    shuffled = manifest.copy()
    shuffled.loc[test, "who_type"] = np.roll(shuffled.loc[test, "who_type"].to_numpy(), 3)
    write_manifest(shuffled, folder / "manifest.tsv")
    patches = folder / "patches"
    shutil.copytree(root / "patches", patches)
    for row in manifest[test & (manifest["modality"] == "WSI")].itertuples():
        shutil.rmtree(patches / f"{row.image_id}.zarr")
    return folder / "manifest.tsv", patches


@pytest.mark.parametrize("variant", sorted(BASELINES))
def test_comparison_methods_train_on_a_fold_and_predict_from_ct_alone(
    cohort, trained, tmp_path, variant
):
    """Each comparison method writes one prediction per test sequence; with the test labels
    permuted and the test slides deleted its predictions are the same."""
    settings = _method(epochs=1)
    settings["variants"] = settings["variants"] | BASELINES
    teacher = trained / "teacher/fold_0/model.safetensors" if variant == "sckd" else None
    metrics = _fold(cohort, variant, tmp_path / "plain", settings=settings, teacher=teacher)
    assert set(metrics) == set(METRICS)
    manifest, patches = _blinded_inputs(cohort, tmp_path)
    _fold(
        cohort,
        variant,
        tmp_path / "blind",
        manifest=manifest,
        patches=patches,
        settings=settings,
        teacher=teacher,
    )
    columns = [f"prob_{t}" for t in WHO_TYPES]
    expected = read_tsv(tmp_path / "plain/predictions.tsv")
    got = read_tsv(tmp_path / "blind/predictions.tsv")
    assert list(expected["sequence"]) == list(
        read_tsv(trained / "mhd_net/fold_0/predictions.tsv")["sequence"]
    )
    np.testing.assert_array_equal(got[columns].to_numpy(), expected[columns].to_numpy())
    if variant == "sckd":  # its checkpoint is the CT student alone
        assert {k.split(".")[0] for k in load_file(tmp_path / "plain/model.safetensors")} == {
            "backbone",
            "head",
        }


def test_evaluating_the_deployed_student_changes_no_byte_of_its_memory(cohort, trained):
    root, rules = cohort
    settings = _method()
    patients = load_patients(root / "manifest.tsv", root / "patches", settings, "who_type")
    split = pd.read_json(root / "splits.json", typ="series")["folds"][0]
    datasets = fold_datasets(patients, split, list(WHO_TYPES), settings, seed=0, wsi_parts=())
    distiller = build_model(settings, "mhd_net", 8)
    deployed = distiller.deploy()
    state = load_file(trained / "mhd_net/fold_0/model.safetensors")
    deployed.load_state_dict(state)
    deployed.eval()
    before = {k: v.numpy().tobytes() for k, v in deployed.state_dict().items()}
    cpu = torch.device("cpu")
    outputs = predict_types(lambda b: {"p": deployed(b)}, datasets["test"], 8, 4, cpu)
    assert {k: v.numpy().tobytes() for k, v in deployed.state_dict().items()} == before
    # even a forward pass in training mode leaves the frozen memory and B_R as they were
    deployed.train()
    predict_types(lambda b: {"p": deployed(b)}, datasets["test"], 8, 4, cpu)
    after = {k: v.numpy().tobytes() for k, v in deployed.state_dict().items()}
    frozen = [k for k in before if k.startswith(("memory.", "radiology"))]
    assert frozen and all(before[k] == after[k] for k in frozen)
    expected = read_tsv(trained / "mhd_net/fold_0/predictions.tsv")
    np.testing.assert_allclose(
        outputs["p"], expected[[f"prob_{t}" for t in WHO_TYPES]].to_numpy(), atol=1e-6
    )


def test_a_student_needs_its_teachers_checkpoint(cohort, tmp_path):
    with pytest.raises(ValueError, match="give its teacher's checkpoint"):
        _fold(cohort, "mhd_net", tmp_path / "out")


def test_collate_keeps_the_tensors_the_networks_read():
    items = [
        {
            "ct": torch.zeros(1, 2),
            "label": torch.tensor(1),
            "tumour": torch.tensor(True),
            "patient_id": "P1",
            "start": 3,
        }
    ] * 2
    batch = collate_tensors(items)
    assert set(batch) == {"ct", "label", "tumour"} and batch["ct"].shape == (2, 1, 2)


# --------------------------------------------------------------------------- figures


def test_figures_of_a_trained_fold(cohort, trained, tmp_path):
    _, rules = cohort
    settings = _method()
    settings["figures"] = {
        "roc": {"rows": ["teacher"], "branches_of": "teacher"},
        "confusion": ["mhd_net"],
        "sweeps": {},
        "parameters": ["teacher", "mhd_net", "ct_resnet18"],
        "labels": {},
    }
    written = mhd_figures.write_mhd_figures(
        method="mhd",
        method_settings=settings,
        manifest_rules=rules,
        results_dir=trained,
        out_dir=tmp_path,
    )
    assert sorted(p.name for p in written) == [
        "confusion_mhd_net.png",
        "parameters.png",
        "roc_teachers.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_parameter_counts_are_each_networks_own():
    settings = _method()
    teacher = build_model(settings, "teacher", 8)
    distiller = build_model(settings, "mhd_net", 8)
    count = mhd_figures.parameter_count
    assert count(settings, "teacher", 8) == sum(p.numel() for p in teacher.teacher.parameters())
    assert count(settings, "mhd_net", 8) == sum(p.numel() for p in distiller.student.parameters())
    assert count(settings, "mhd_net", 8) < count(settings, "teacher", 8)


def test_roc_comparison_and_parameter_bars_check_their_input(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"fold": 0, "y_true": np.arange(20) % 2, "y_pred": 0, "prob_a": rng.random(20)}
    )
    frame["prob_b"] = 1 - frame["prob_a"]
    other = frame.rename(columns={"prob_b": "prob_c"})
    with pytest.raises(ValueError, match="classes"):
        figures.plot_roc_comparison({"x": frame, "y": other}, tmp_path / "r.png", title="t")
    with pytest.raises(ValueError, match="non-empty"):
        figures.plot_roc_comparison({}, tmp_path / "r.png", title="t")
    path = figures.plot_roc_comparison({"x": frame, "y": frame}, tmp_path / "r.png", title="t")
    assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="non-empty"):
        figures.plot_parameter_counts({}, tmp_path / "p.png", title="t")


def test_the_seed_experiment_config_trains_one_holdout_with_five_seeds():
    config = load_config([*default_config_files(ROOT), ROOT / "config/experiments/mhd_seeds.yaml"])
    settings = config["methods"]["mhd_seeds"]
    scheme = config["splits"]["schemes"][settings["split"]]
    assert (scheme["type"], scheme["n_seeds"]) == ("holdout", 5)
    assert settings["network"] == config["methods"]["mhd"]["network"] | {
        k: settings["network"][k] for k in ("student_widths", "backbone", "reduction", "decay")
    }
    assert settings["sequences"] == config["methods"]["mhd"]["sequences"]
    assert list(config_problems("mhd_seeds", settings, config)) == []


def test_a_fold_interrupted_after_an_epoch_resumes_to_the_same_files(cohort, trained, tmp_path):
    """The teacher's run broken after epoch 1 continues from its saved state (the pairing of
    epoch 2 included) and ends with the predictions of the unbroken run."""
    import mmdiag.training.loop as loop

    original = loop._epoch_row

    def broken(run, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return original(run, epoch, *args)

    out = tmp_path / "teacher/fold_0"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_epoch_row", broken)
        with pytest.raises(KeyboardInterrupt):
            _fold(cohort, "teacher", out)
    assert not out.exists() and (tmp_path / "teacher/.fold_0.resume").is_dir()
    _fold(cohort, "teacher", out)
    expected = read_tsv(trained / "teacher/fold_0/predictions.tsv")
    pd.testing.assert_frame_equal(read_tsv(out / "predictions.tsv"), expected)
    log = read_tsv(out / "train_log.tsv")
    assert list(log["epoch"]) == [1, 2]
