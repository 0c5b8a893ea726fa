"""Data-parallel fold training: two torchrun processes (gloo, CPU) train what one process trains.

Run as a module (``python -m tests.test_distributed_training OUT DEVICE``, alone or under
torchrun), this file is also the worker of the float64 comparison.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmdiag.config import load_config
from mmdiag.data.manifest import ManifestRules, build_manifest, read_manifest, write_manifest
from mmdiag.data.splits import make_splits, write_splits
from mmdiag.methods.cmus.data import PatientSample, collate_patients
from mmdiag.models import create_model
from mmdiag.synth import write_synthetic_cohort
from mmdiag.training.distributed import gather_rows, init_distributed, shutdown, unwrap
from mmdiag.training.loop import (
    GlobalBatchDropout,
    TrainSettings,
    predict_proba,
    sample_generators,
    train_model,
)

from .test_config import DEMO
from .test_workflow import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASSES = ("IgAN", "MN", "LN")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _sample(patient_id: str, n_tem: int, seed: int, size_px: int = 8) -> PatientSample:
    generator = torch.Generator().manual_seed(seed)

    def images(n):
        shape = (n, 3, size_px, size_px)
        return torch.randint(0, 255, shape, generator=generator, dtype=torch.uint8)

    return PatientSample(patient_id, seed % 3, images(1)[0], images(1)[0], images(n_tem))


def test_per_sample_flips_do_not_depend_on_the_batch():
    samples = [_sample("a", 2, 1), _sample("b", 3, 2), _sample("c", 1, 3)]
    seeds = torch.tensor([11, 12, 13])
    whole = collate_patients(
        samples, mean=MEAN, std=STD, augment_generator=sample_generators(seeds)
    )
    first = collate_patients(
        samples[:1], mean=MEAN, std=STD, augment_generator=sample_generators(seeds[:1])
    )
    rest = collate_patients(
        samples[1:], mean=MEAN, std=STD, augment_generator=sample_generators(seeds[1:])
    )
    for key in ("om", "im", "tem"):
        torch.testing.assert_close(whole[key], torch.cat([first[key], rest[key]]), rtol=0, atol=0)
    plain = collate_patients(samples, mean=MEAN, std=STD)
    assert not torch.equal(whole["tem"], plain["tem"])  # something was flipped
    with pytest.raises(ValueError, match="2 generators for 3 samples"):
        collate_patients(
            samples, mean=MEAN, std=STD, augment_generator=sample_generators(seeds[:2])
        )


def test_global_batch_dropout_cuts_the_same_mask_for_every_share():
    x = torch.ones(5, 7)
    whole = GlobalBatchDropout(0.5, torch.Generator().manual_seed(4))(x)
    shares = []
    for first, rows in ((0, 3), (3, 2)):
        dropout = GlobalBatchDropout(0.5, torch.Generator().manual_seed(4))
        dropout.share = (first, 5)
        shares.append(dropout(x[first : first + rows]))
    torch.testing.assert_close(torch.cat(shares), whole, rtol=0, atol=0)
    assert set(whole.unique().tolist()) == {0.0, 2.0}
    dropout = GlobalBatchDropout(0.5, torch.Generator())
    dropout.share = (3, 5)
    with pytest.raises(ValueError, match="first dimension is the sample"):
        dropout(torch.ones(4, 7))
    assert torch.equal(dropout.eval()(x), x)


def test_cpu_batch_norm_sync_keeps_frozen_layers_frozen():
    """A replaced batch norm keeps its parameters' ``requires_grad`` and a frozen layer's
    evaluation mode (no process group is needed to replace layers)."""
    from mmdiag.training.distributed import CrossRankBatchNorm, DistContext, sync_batchnorm
    from mmdiag.training.stages import freeze

    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    )
    freeze(model[1])
    model[2].bias.requires_grad_(False)
    context = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    synced = sync_batchnorm(model, context).train()
    assert all(isinstance(synced[i], CrossRankBatchNorm) for i in (1, 2))
    assert not synced[1].training and synced[2].training
    assert not synced[1].weight.requires_grad and not synced[1].bias.requires_grad
    assert synced[2].weight.requires_grad and not synced[2].bias.requires_grad


def _collate_float64(samples, generators):
    batch = collate_patients(samples, mean=MEAN, std=STD, augment_generator=generators)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _train_float64(out: Path, device: str) -> None:
    """Train a tiny CMUS-Net in float64 on 7 patients (batches of 3 + 4), validate on 3,
    predict 5; the first process saves weights, log, predictions and, per process, the GPU
    it used and its peak GPU memory to ``out``."""
    context = init_distributed(device)
    torch.manual_seed(0)
    model = create_model("cmus_net", num_classes=3, encoder="test_resnet").double()
    patients = [_sample(f"p{i}", 1 + i % 3, i, size_px=32) for i in range(15)]
    settings = TrainSettings(
        epochs=2, batch_size=3, lr=1e-3, lr_min=1e-5, weight_decay=5e-5, device=device
    )
    history = train_model(
        model, patients[:7], _collate_float64, settings, val_samples=patients[7:10], context=context
    )
    prob, loss = predict_proba(
        model, patients[10:], _collate_float64, batch_size=3, device=context.device, context=context
    )
    on_gpu = context.device.type == "cuda"
    usage = torch.tensor(
        [[context.device.index or 0, torch.cuda.max_memory_allocated() if on_gpu else 0]],
        dtype=torch.float64,
        device=context.device,
    )
    usage = gather_rows(usage, context).cpu()
    if context.is_main:
        state = {k: v.cpu().clone() for k, v in unwrap(model).state_dict().items()}
        result = {"state": state, "history": history, "prob": prob, "loss": loss, "gpus": usage}
        torch.save(result, out)
    shutdown(context)


def _run_module(launcher: list[str], *arguments: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    result = subprocess.run(
        [*launcher, *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _torchrun(n_processes: int) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    return [torchrun, "--standalone", "--nproc-per-node", str(n_processes)]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                torch.cuda.device_count() < 2, reason="needs a machine with 2 or more GPUs"
            ),
        ),
    ],
)
def test_two_processes_equal_one_in_float64(tmp_path, device):
    """Shares of 2 + 1 and 2 + 2 patients, synchronised batch norm, DDP, per-sample flips and
    global-batch dropout: in float64 the two runs agree to summation order. On GPUs (NCCL,
    SyncBatchNorm) every GPU of the job is used, one per process."""
    module = ["-m", "tests.test_distributed_training"]
    n_gpus = torch.cuda.device_count() if device == "cuda" else 2
    _run_module([str(BIN / "python")], *module, str(tmp_path / "one.pt"), device)
    _run_module(_torchrun(n_gpus), *module, str(tmp_path / "two.pt"), device)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["state"].keys() == two["state"].keys()
    for name, tensor in one["state"].items():
        torch.testing.assert_close(two["state"][name], tensor, rtol=1e-9, atol=1e-9, msg=name)
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        row_one.pop("seconds"), row_two.pop("seconds")
        assert row_two == pytest.approx(row_one, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(two["prob"], one["prob"], rtol=0, atol=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)
    trained = create_model("cmus_net", num_classes=3, encoder="test_resnet")
    assert not torch.allclose(one["state"]["head.fc1.weight"].float(), trained.head.fc1.weight)
    if device == "cuda":
        assert sorted(two["gpus"][:, 0].tolist()) == list(range(n_gpus))  # one GPU per process
        assert (two["gpus"][:, 1] > 0).all()  # and each of them held tensors


@pytest.fixture(scope="module")
def tiny_fold(tmp_path_factory):
    """13 patients, 3 folds with a validation part; settings for a 2-epoch fold on the CPU.

    Batches of 3 split unevenly over 2 processes (2 + 1), and 5 test patients too (3 + 2).
    """
    config = load_config(DEMO)
    root = tmp_path_factory.mktemp("ddp")
    synth = copy.deepcopy(config["synth"]) | {
        "n_patients": 13,
        "om_size_px": [64, 48],
        "im_size_px": [64, 48],
        "tem_size_px": 48,
        "tem_legend_px": 4,
        "tem_per_patient": [1, 3],
    }
    synth["wsi"]["n_patients"] = synth["ct"]["n_patients"] = 0
    cohort = write_synthetic_cohort(root / "raw", synth, progress=False)
    rules = ManifestRules(
        classes=CLASSES, stages=("I", "II", "III"), required_modalities=("OM", "IM", "TEM")
    )
    manifest = write_manifest(build_manifest(cohort_root=cohort, rules=rules), root / "m.tsv")
    scheme = {"type": "kfold", "n_folds": 3, "label": "disease", "val_fraction": 0.25}
    splits = write_splits(
        make_splits(read_manifest(manifest), "k3", scheme, seed=1), root / "s.json"
    )
    method = copy.deepcopy(config["methods"]["cmus"])
    method["preprocess"] |= {"image_size_px": 32, "tem_legend_px": 4}
    method["train"] |= {"epochs": 2, "batch_size": 3, "device": "cpu"}
    settings = {"methods": {"cmus": method}, "manifest": config["manifest"]}
    return root, manifest, splits, json.dumps(settings)


def _train(launcher, tiny_fold, variant, out):
    root, manifest, splits, settings = tiny_fold
    arguments = [
        "-m",
        "mmdiag",
        "cmus",
        "train",
        "--method",
        "cmus",
        "--variant",
        variant,
        "--fold",
        "0",
    ]
    arguments += ["--manifest", str(manifest), "--splits", str(splits), "--out", str(out)]
    _run_module(launcher, *arguments, "--threads", "1", "--settings-json", settings)


@pytest.mark.parametrize("variant", ["cmus_net", "none"])
def test_two_processes_train_the_same_fold_as_one(tiny_fold, variant):
    """The fold command, as the workflow starts it, in float32: SMIL + CMSA + weighted loss, and
    the plain variant whose per-modality heads are unused.

    Weights are compared in the float64 test: in float32, summation order changes gradients by
    about 1e-5 (relative), and Adam turns the noise of near-zero gradients into steps of up to
    the learning rate.
    """
    root = tiny_fold[0]
    single, parallel = root / variant / "single", root / variant / "parallel"
    _train([str(BIN / "python")], tiny_fold, variant, single)
    _train(_torchrun(2), tiny_fold, variant, parallel)

    one = pd.read_csv(single / "predictions.tsv", sep="\t")
    two = pd.read_csv(parallel / "predictions.tsv", sep="\t")
    assert len(one) == 5 and one[["patient_id", "y_true"]].equals(two[["patient_id", "y_true"]])
    prob_columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(two[prob_columns], one[prob_columns], atol=1e-4)

    weights_one = load_file(str(single / "model.safetensors"))
    assert load_file(str(parallel / "model.safetensors")).keys() == weights_one.keys()

    log_one = pd.read_csv(single / "train_log.tsv", sep="\t")
    log_two = pd.read_csv(parallel / "train_log.tsv", sep="\t")
    columns = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    np.testing.assert_allclose(log_two[columns], log_one[columns], rtol=1e-3, atol=1e-4)

    assert yaml.safe_load((parallel / "config.yaml").read_text())["n_processes"] == 2
    assert sorted(p.name for p in parallel.parent.iterdir()) == ["parallel", "single"]


def test_a_batch_smaller_than_the_process_count_is_refused(tiny_fold, tmp_path):
    root, manifest, splits, settings = tiny_fold
    small = json.loads(settings)
    small["methods"]["cmus"]["train"]["batch_size"] = 1
    with pytest.raises(AssertionError, match="cannot be split across 2 processes"):
        _train(_torchrun(2), (root, manifest, splits, json.dumps(small)), "om", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_rule_given_several_gpus_starts_torchrun(tmp_path):
    copy_workflow(tmp_path)
    command = [str(BIN / "snakemake"), "results/cmus/cmus_net/fold_0/metrics.tsv", "-n", "-p"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    shells = {}
    for gpus in (0, 1, 4):
        options = ["--set-resources", f"cmus_train_fold:gpu={gpus}", "--resources", "gpu=4"]
        result = subprocess.run(
            command + options, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        shells[gpus] = next(
            line for line in result.stdout.splitlines() if "-m mmdiag cmus train" in line
        )
    assert "torchrun" not in shells[0] and "torchrun" not in shells[1]
    assert "python -m mmdiag cmus train" in shells[1]
    assert "torchrun --standalone --nproc-per-node 4 -m mmdiag cmus train" in shells[4]


if __name__ == "__main__":
    _train_float64(Path(sys.argv[1]), sys.argv[2])
