"""Model registry (every registered model forward and backward), the CMUS concatenation
baseline and encoder checkpoint loading."""

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from mmdiag.models import create_model, list_models, registered_model
from mmdiag.models.cmus import bag_mean
from mmdiag.models.encoders import create_encoder, load_encoder_checkpoint

TINY = {"encoder": "test_convnext", "hidden_dim": 16}


def _batch(n_patients=2, tem_counts=(2, 3), size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "om": torch.randn(n_patients, 3, size, size, generator=generator),
        "im": torch.randn(n_patients, 3, size, size, generator=generator),
        "tem": torch.randn(sum(tem_counts), 3, size, size, generator=generator),
        "tem_patient": torch.repeat_interleave(torch.arange(n_patients), torch.tensor(tem_counts)),
    }


def _training_loss(model, batch):
    """The model's own loss when it has one (as the training loop), else cross-entropy."""
    if hasattr(model, "loss"):
        return model.loss(batch)[0]
    return F.cross_entropy(model(batch), batch["label"])


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_forward_and_backward(name):
    entry = registered_model(name)
    kwargs, batch = entry.example()
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    output = model(batch)
    n_cases = len(batch["label"])
    assert output.shape[0] == n_cases and torch.isfinite(output).all()
    loss = _training_loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    parameters = [p for p in model.parameters() if p.requires_grad]
    learning = [p for p in parameters if p.grad is not None and p.grad.abs().sum() > 0]
    # every part learns (a token-map encoder's unused classifier norm may stay without a gradient)
    assert len(learning) > 0.8 * len(parameters), f"{len(learning)} of {len(parameters)}"
    # the model depends on its input: another batch gives other outputs
    other = {
        k: (v + 1.0 if v.is_floating_point() and k != "label" else v) for k, v in batch.items()
    }
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(batch), model(other))


def test_every_model_names_a_configured_family():
    from mmdiag.config import method_families

    families = set(method_families())
    assert {registered_model(name).family for name in list_models()} <= families
    assert list_models("csmil") and set(list_models("csmil")) < set(list_models())


@pytest.mark.parametrize("name", list_models("cmus"))
@pytest.mark.parametrize("modalities", [("OM", "IM", "TEM"), ("OM",), ("IM", "TEM")])
def test_every_cmus_model_trains_each_modality_subset(name, modalities):
    model = create_model(name, num_classes=3, modalities=modalities, **TINY)
    logits = model(_batch())
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    for modality in modalities:
        grads = [p.grad for p in model.encoders[modality].parameters() if p.grad is not None]
        assert len(grads) > 0.8 * len(list(model.encoders[modality].parameters()))
        assert any(g.abs().sum() > 0 for g in grads)
    assert set(model.encoders) == set(modalities)


def test_unknown_model_names_the_registry():
    with pytest.raises(ValueError, match="cmus_concat"):
        create_model("no_such_model")
    with pytest.raises(ValueError, match="subset"):
        create_model("cmus_concat", modalities=("XR",), **TINY)


def test_bag_mean_matches_a_loop():
    features = torch.randn(7, 5)
    bags = torch.tensor([2, 0, 0, 2, 1, 2, 0])
    expected = torch.stack([features[bags == b].mean(0) for b in range(3)])
    torch.testing.assert_close(bag_mean(features, bags, 3), expected)


def test_tem_bag_order_does_not_matter():
    model = create_model("cmus_concat", num_classes=3, **TINY).eval()
    batch = _batch()
    permutation = torch.tensor([4, 0, 3, 1, 2])
    shuffled = dict(
        batch, tem=batch["tem"][permutation], tem_patient=batch["tem_patient"][permutation]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(shuffled), rtol=1e-4, atol=1e-5)


def test_each_patient_sees_only_its_own_tem_images():
    model = create_model("cmus_concat", num_classes=3, **TINY).eval()
    batch = _batch()
    changed = dict(batch, tem=batch["tem"].clone())
    changed["tem"][2:] += 3.0  # patient 1's TEM images only
    with torch.no_grad():
        before, after = model(batch), model(changed)
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_encoder_checkpoint_round_trip(tmp_path, suffix):
    source = create_encoder("test_convnext")
    # a checkpoint as training frameworks write it: wrapped names and a classifier head
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    state["module.head.fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = create_model("cmus_concat", num_classes=3, checkpoint=str(path), **TINY)
    for encoder in model.encoders.values():
        for key, value in source.state_dict().items():
            torch.testing.assert_close(encoder.state_dict()[key], value)


def test_encoder_checkpoint_errors_name_the_file(tmp_path):
    encoder = create_encoder("test_convnext")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"stem.0.weight": torch.zeros(1, 1, 1, 1)}, str(wrong))
    with pytest.raises(ValueError, match="wrong.safetensors.*shape mismatch"):
        load_encoder_checkpoint(encoder, wrong)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(unrelated))
    with pytest.raises(ValueError, match="unrelated.safetensors.*no parameter"):
        load_encoder_checkpoint(encoder, unrelated)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_encoder_checkpoint(encoder, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown timm encoder"):
        create_encoder("not_a_timm_model")
