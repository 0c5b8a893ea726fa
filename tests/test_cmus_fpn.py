"""FPN as a classifier (CMUS-Net Tables 5 and 6, Sec. 5.2.1): shapes, every pyramid level
reaching the logits, a learning signal, checkpoints of its backbone, and its use as the
per-modality encoder of the concatenation baseline."""

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from mmdiag.models import cmus as cmus_models
from mmdiag.models import create_model
from mmdiag.models.cmus import CMUSNet, tiny_example
from mmdiag.models.encoders import CheckpointError
from mmdiag.models.fpn import (
    FPN_CHANNELS,
    FeaturePyramidClassifier,
    create_fpn_encoder,
    fpn_backbone,
)
from tests.image_classifiers import assert_loss_falls_on_separable_images, random_images

BACKBONE = "test_resnet"  # timm's tiny ResNet: five feature maps, strides 2-32
TINY = {"backbone": BACKBONE, "fpn_channels": 8, "hidden_dim": 8, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_output_shapes():
    torch.manual_seed(0)
    model = FeaturePyramidClassifier(3, **TINY).eval()
    images = random_images()
    levels = model.pyramid(images)
    # P2-P5: strides 4, 8, 16, 32 with fpn_channels each (Lin et al. Sec. 3)
    assert [tuple(level.shape) for level in levels] == [
        (2, 8, 32 // s, 32 // s) for s in (4, 8, 16, 32)
    ]
    assert model.forward_features(images).shape == (2, 4 * 8) == (2, model.num_features)
    assert model(images).shape == (2, 3)


def test_headless_model_is_an_encoder_of_pooled_pyramid_features():
    encoder = FeaturePyramidClassifier(0, backbone=BACKBONE).eval()
    assert encoder.num_levels == 4 and encoder.num_features == 4 * FPN_CHANNELS
    with torch.no_grad():
        features = encoder(random_images())
    assert features.shape == (2, 4 * FPN_CHANNELS)
    torch.testing.assert_close(features, encoder.forward_features(random_images()))


def test_every_pyramid_level_reaches_the_logits():
    torch.manual_seed(0)
    model = FeaturePyramidClassifier(3, **TINY).eval()
    with torch.no_grad():
        levels = model.pyramid(random_images())
        pooled = model.pool(levels)
        assert pooled.shape[1] == len(levels) * 8  # levels x FPN channels
        logits = model.forward_head(pooled)
        for index in range(len(levels)):
            zeroed = [torch.zeros_like(lv) if i == index else lv for i, lv in enumerate(levels)]
            assert not torch.allclose(model.forward_head(model.pool(zeroed)), logits), index


def test_loss_falls_on_a_separable_problem():
    torch.manual_seed(0)
    assert_loss_falls_on_separable_images(FeaturePyramidClassifier(2, **TINY), lr=1e-2)


def test_backbone_loads_a_local_checkpoint_of_the_timm_classifier(tmp_path):
    classifier = timm.create_model(BACKBONE)  # with its head, as ImageNet checkpoints come
    path = tmp_path / "test_resnet.safetensors"
    save_file(classifier.state_dict(), str(path))
    encoder = create_fpn_encoder(f"fpn_{BACKBONE}", checkpoint=str(path))
    for name, tensor in encoder.backbone.state_dict().items():
        torch.testing.assert_close(tensor, classifier.state_dict()[name], msg=name)
    other = tmp_path / "test_convnext.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(other))
    with pytest.raises(CheckpointError, match="test_resnet"):
        create_fpn_encoder(f"fpn_{BACKBONE}", checkpoint=str(other))


def test_encoder_names_and_bad_arguments():
    assert fpn_backbone("fpn_resnet50") == "resnet50"
    assert fpn_backbone("resnet50") is None
    with pytest.raises(ValueError, match="fpn_<timm backbone>"):
        create_fpn_encoder("resnet50")
    with pytest.raises(ValueError, match="no_such_net"):
        create_fpn_encoder("fpn_no_such_net")
    with pytest.raises(ValueError, match="num_classes"):
        FeaturePyramidClassifier(-1, backbone=BACKBONE)
    with pytest.raises(ValueError, match="cmus_concat"):
        CMUSNet(encoder=f"fpn_{BACKBONE}")


def test_fpn_encoders_inside_the_concatenation_baseline():
    _, batch = tiny_example()
    torch.manual_seed(0)
    model = create_model("cmus_concat", num_classes=3, encoder=f"fpn_{BACKBONE}", hidden_dim=8)
    assert all(isinstance(e, FeaturePyramidClassifier) for e in model.encoders.values())
    assert model.num_features == 3 * 4 * FPN_CHANNELS  # OM, IM, TEM pooled pyramids
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits = model(batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, batch["label"]).backward()
    for modality, encoder in model.encoders.items():
        grads = [p.grad for p in encoder.fpn.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), modality
    optimiser.step()
    with torch.no_grad():
        assert not torch.allclose(model(batch), logits)


def test_test_backbone_gives_no_random_init_warning(monkeypatch, caplog):
    monkeypatch.setattr(cmus_models, "_warned_random_init", False)
    caplog.set_level(logging.WARNING, logger=cmus_models.__name__)
    create_model("cmus_concat", encoder=f"fpn_{BACKBONE}", modalities=["OM"], hidden_dim=8)
    assert not [r for r in caplog.records if r.name == cmus_models.__name__]


def test_default_backbone_is_resnet50_with_levels_c2_to_c5():
    encoder = FeaturePyramidClassifier(0)
    info = encoder.backbone.feature_info
    assert info.channels() == [256, 512, 1024, 2048]  # C2-C5 of ResNet-50
    assert info.reduction() == [4, 8, 16, 32]
    assert encoder.num_features == 4 * 256
