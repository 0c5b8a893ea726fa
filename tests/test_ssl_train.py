"""SimSiam: the model and loss, and pretraining on small textured patch stores."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from mmdiag.ssl import train as ssl_train
from mmdiag.ssl.simsiam import (
    SimSiam,
    embedding_std,
    prediction_mlp,
    projection_mlp,
    simsiam_loss,
)
from mmdiag.ssl.train import build_simsiam, cosine_lr, pretrain

from .ssl_helpers import tiny_settings, torch_threads, write_textured_store


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------- model and loss


def _tiny_simsiam(seed: int = 0) -> SimSiam:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.num_features = 8
    return SimSiam(backbone, dim=16, predictor_dim=4)


def test_loss_of_identical_predictions_and_targets_is_minus_one():
    z = torch.randn(10, 16)
    outputs = {"p1": z, "p2": 3 * z, "z1": z, "z2": z}
    assert simsiam_loss(outputs).item() == pytest.approx(-1.0, abs=1e-6)
    opposite = {"p1": -z, "p2": -z, "z1": z, "z2": z}
    assert simsiam_loss(opposite).item() == pytest.approx(1.0, abs=1e-6)


def test_loss_is_the_symmetrised_negative_cosine():
    generator = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = torch.randn(4, 6, 16, generator=generator)
    expected = 0.0
    for p, z in ((p1, z2), (p2, z1)):
        cosines = [(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(6)]
        expected += -0.5 * sum(cosines) / 6
    outputs = {"p1": p1, "p2": p2, "z1": z1, "z2": z2}
    assert simsiam_loss(outputs).item() == pytest.approx(expected.item(), abs=1e-6)


def test_stop_gradient_targets_carry_no_gradient():
    model = _tiny_simsiam()
    views = torch.randn(2, 6, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    outputs = model(*views)
    assert not outputs["z1"].requires_grad and not outputs["z2"].requires_grad
    assert outputs["p1"].requires_grad and outputs["p2"].requires_grad
    simsiam_loss(outputs).backward()
    ours = [p.grad.clone() for p in model.parameters()]

    def reference_grads(stop_gradient: bool):
        model.zero_grad()
        z1, z2 = (model.projector(model.backbone(v)) for v in views)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        if stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        loss = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for mine, reference in zip(ours, reference_grads(True), strict=True):
        torch.testing.assert_close(mine, reference)
    without = reference_grads(False)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, without, strict=True))


def test_projector_and_predictor_layers():
    projector = projection_mlp(96, 64)
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(96, 64), (64, 64), (64, 64)]
    assert all(m.bias is None for m in linears)  # BN follows: a bias would be redundant
    norms = [layer for layer in projector if isinstance(layer, nn.BatchNorm1d)]
    assert [m.affine for m in norms] == [True, True, False]
    predictor = prediction_mlp(64, 16)
    assert [type(layer) for layer in predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (predictor[0].in_features, predictor[0].out_features) == (64, 16)
    assert (predictor[3].in_features, predictor[3].out_features) == (16, 64)
    assert predictor[3].bias is not None
    model = build_simsiam(tiny_settings())
    outputs = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert {key: tuple(v.shape) for key, v in outputs.items()} == dict.fromkeys(outputs, (4, 64))


def test_embedding_std_detects_collapse():
    z = torch.randn(8192, 64, generator=torch.Generator().manual_seed(3))
    assert embedding_std(z).item() == pytest.approx(1 / math.sqrt(64), rel=0.02)
    assert embedding_std(5 * z).item() == pytest.approx(embedding_std(z).item(), rel=1e-5)
    assert embedding_std(torch.ones(100, 64) * 3).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ssl_stores")
    return [write_textured_store(folder / f"slide{i}.zarr", 40, seed=i) for i in range(2)]


def _run(stores, folder, settings, **kwargs):
    history = pretrain(
        stores, "20x", settings, out_dir=folder / "out", state_dir=folder / "state",
        progress=False, **kwargs,
    )  # fmt: skip
    return history, load_file(str(folder / "out" / "encoder.safetensors"))


def _count_epochs(monkeypatch) -> list[int]:
    """Record the epochs :func:`train_one_epoch` actually trains."""
    trained, original = [], ssl_train.train_one_epoch

    def counting(*args, **kwargs):
        trained.append(args[5])
        return original(*args, **kwargs)

    monkeypatch.setattr(ssl_train, "train_one_epoch", counting)
    return trained


def test_pretraining_learns_without_collapse_and_writes_outputs(stores, tmp_path):
    settings = tiny_settings(epochs=8, base_lr=2.0)
    history, weights = _run(stores, tmp_path, settings)
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0] - 0.2, losses
    assert min(row["embedding_std"] for row in history) > 0.5 / math.sqrt(settings.dim)
    expected_lr = [cosine_lr(2.0 * 16 / 256, epoch, 8) for epoch in range(8)]
    assert [row["lr"] for row in history] == pytest.approx(expected_lr)
    assert expected_lr[0] == pytest.approx(0.125) and expected_lr[4] == pytest.approx(0.0625)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "encoder.safetensors", "loss.png", "train_log.tsv",
    ]  # fmt: skip
    log = pd.read_csv(out / "train_log.tsv", sep="\t")
    assert list(log.columns) == ["epoch", "lr", "loss", "embedding_std", "images_per_s", "seconds"]
    assert log["epoch"].tolist() == list(range(1, 9))
    assert log["loss"].tolist() == pytest.approx(losses)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["scale"] == "20x" and config["ssl"]["base_lr"] == 2.0
    assert config["patch_stores"] == [str(p) for p in stores]
    encoder = timm.create_model("test_resnet", num_classes=0)
    encoder.load_state_dict(weights, strict=True)
    assert not (tmp_path / "state").exists()


def test_interrupted_run_resumes_to_the_same_weights(stores, tmp_path, monkeypatch):
    settings = tiny_settings(epochs=3)
    whole_history, whole = _run(stores, tmp_path / "whole", settings)
    original_save = ssl_train.save_state

    def save_then_crash(state_dir, model, optimiser, info):
        original_save(state_dir, model, optimiser, info)
        if info["epochs_done"] == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    with monkeypatch.context() as patch:
        patch.setattr(ssl_train, "save_state", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            _run(stores, tmp_path / "cut", settings)
    assert not (tmp_path / "cut" / "out").exists()
    state = tmp_path / "cut" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["state.json", "state_2.safetensors"]
    trained = _count_epochs(monkeypatch)
    resumed_history, resumed = _run(stores, tmp_path / "cut", settings)
    assert trained == [2]  # only the third epoch ran again
    assert [row["loss"] for row in resumed_history] == [row["loss"] for row in whole_history]
    assert weights_equal(resumed, whole)
    assert not (tmp_path / "cut" / "state").exists()


def test_a_kill_between_the_weights_and_the_progress_file_resumes_the_epoch_before(
    stores, tmp_path, monkeypatch
):
    """Epoch 2's weights are written, its progress file is not: the resumed run must take
    epoch 1's weights with epoch 1's progress, not epoch 2's weights as if from epoch 1."""
    settings = tiny_settings(epochs=3)
    whole_history, whole = _run(stores, tmp_path / "whole", settings)
    original_write = ssl_train.write_json

    def crash_before_progress(info, path):
        if Path(path).name == ssl_train.STATE_INFO and info["epochs_done"] == 2:
            raise KeyboardInterrupt("killed between the two files")
        return original_write(info, path)

    with monkeypatch.context() as patch:
        patch.setattr(ssl_train, "write_json", crash_before_progress)
        with pytest.raises(KeyboardInterrupt):
            _run(stores, tmp_path / "cut", settings)
    trained = _count_epochs(monkeypatch)
    resumed_history, resumed = _run(stores, tmp_path / "cut", settings)
    assert trained == [1, 2]
    assert [row["loss"] for row in resumed_history] == [row["loss"] for row in whole_history]
    assert weights_equal(resumed, whole)


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_of_other_settings_is_ignored(stores, tmp_path, monkeypatch):
    def crash_after_first(state_dir, model, optimiser, info):
        original(state_dir, model, optimiser, info)
        raise KeyboardInterrupt

    original = ssl_train.save_state
    with monkeypatch.context() as patch:
        patch.setattr(ssl_train, "save_state", crash_after_first)
        with pytest.raises(KeyboardInterrupt):
            _run(stores, tmp_path / "run", tiny_settings(epochs=2, base_lr=0.5))
    trained = _count_epochs(monkeypatch)
    settings = tiny_settings(epochs=2, base_lr=0.3)
    _, after_stale_state = _run(stores, tmp_path / "run", settings)
    assert trained == [0, 1]  # started afresh
    _, fresh = _run(stores, tmp_path / "fresh", settings)
    assert weights_equal(after_stale_state, fresh)


def test_loader_workers_do_not_change_the_weights(stores, tmp_path):
    """Workers only decode: the data order and every augmentation are drawn in the trainer."""
    _, inline = _run(stores, tmp_path / "inline", tiny_settings(epochs=2))
    _, workers = _run(stores, tmp_path / "workers", tiny_settings(epochs=2, workers=2))
    assert weights_equal(workers, inline)


def _checkpoint_state(seed: int) -> dict[str, torch.Tensor]:
    """A test_resnet with a classifier head, every tensor moved away from its initial value."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = value + 0.05 * torch.randn_like(value)
            value = value.abs() if key.endswith("running_var") else value
        state[key] = value
    return state


def _backbone_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_init_checkpoint_is_loaded_into_the_backbone(stores, tmp_path, kind):
    state = _checkpoint_state(seed=11)
    if kind == "torch":
        path = tmp_path / "encoder.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "encoder.safetensors"
        save_file(state, str(path))
    settings = tiny_settings(init_checkpoint=str(path), epochs=1, base_lr=0.0)
    backbone = build_simsiam(settings).backbone.state_dict()
    assert backbone.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)
    # with a zero learning rate the pretrained parameters leave training unchanged
    _, weights = _run(stores, tmp_path, settings)
    parameters = _backbone_parameters(timm.create_model("test_resnet", num_classes=0))
    assert parameters  # names of the learnable tensors
    assert all(torch.equal(weights[name], state[name]) for name in parameters)


def test_store_without_pixels_is_named(stores, tmp_path):
    bare = write_textured_store(tmp_path / "bare.zarr", 10, seed=5, with_pixels=False)
    with pytest.raises(ValueError, match=re.escape(str(bare))):
        _run([stores[0], bare], tmp_path, tiny_settings())
    assert not (tmp_path / "out").exists()


def test_batch_larger_than_the_data_is_refused(stores, tmp_path):
    with pytest.raises(
        ValueError, match=r"batch size 128 \(ssl.batch_size\) exceeds the 80 patches"
    ):
        _run(stores, tmp_path, tiny_settings(batch_size=128))
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()
