"""HiFuse (CMUS-Net Tables 5 and 6, HiFuse row): shapes, the HFF block's attentions and
paths, a learning signal, checkpoints, and its use inside the concatenation baseline."""

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model
from mmdiag.models.cmus import CMUSNet, tiny_example
from mmdiag.models.hifuse import (
    HIFUSE_SIZES,
    HierarchicalFeatureFusion,
    HiFuse,
    create_hifuse_encoder,
)
from tests.image_classifiers import assert_loss_falls_on_separable_images, random_images

TINY = HIFUSE_SIZES["test_hifuse"]  # 32 px, widths 12-96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_output_shapes():
    torch.manual_seed(0)
    model = HiFuse(3, size=TINY).eval()
    stages = model.stage_features(random_images())
    # strides 4-32, the branch widths (both branches NCHW by then)
    strides = (4, 8, 16, 32)
    expected = [(2, dim, 32 // s, 32 // s) for dim, s in zip(TINY.dims, strides, strict=True)]
    assert [tuple(f.shape) for f in stages] == expected
    assert model.forward_features(random_images()).shape == (2, 96) == (2, model.num_features)
    assert model(random_images()).shape == (2, 3)
    assert create_hifuse_encoder("test_hifuse")(random_images()).shape == (2, 96)


def test_paper_size_is_hifuse_t():
    size = HIFUSE_SIZES["hifuse_tiny"]  # ConvNeXt-T + Swin-T (the authors' main_model)
    assert size.dims == (96, 192, 384, 768) and size.conv_depths == (3, 3, 9, 3)
    assert size.swin_depths == (2, 2, 6, 2) and size.swin_heads == (3, 6, 12, 24)
    assert size.window_size == 7 and size.img_size_px == 224


def _block(first=False):
    torch.manual_seed(0)
    return HierarchicalFeatureFusion(8, first=first, se_reduction=2).eval()


def _block_inputs():
    g = torch.Generator().manual_seed(1)
    local, global_ = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    return local, global_, torch.randn(2, 4, 8, 8, generator=g)  # previous: half width, 2x size


def test_hff_spatial_and_channel_attention_by_hand():
    block, (local, global_, _) = _block(), _block_inputs()
    with torch.no_grad():
        stats = torch.cat([local.max(1, keepdim=True).values, local.mean(1, keepdim=True)], 1)
        spatial = torch.sigmoid(block.spatial(stats)) * local
        torch.testing.assert_close(block.spatial_attention(local), spatial)
        mlp = block.channel_mlp
        gate = torch.sigmoid(
            mlp(global_.amax((2, 3), keepdim=True)) + mlp(global_.mean((2, 3), keepdim=True))
        )
        torch.testing.assert_close(block.channel_attention(global_), gate * global_)


def test_hff_output_depends_on_local_global_and_previous():
    block, (local, global_, previous) = _block(), _block_inputs()
    with torch.no_grad():
        out = block(local, global_, previous)
        assert out.shape == local.shape
        for changed in (
            (torch.zeros_like(local), global_, previous),
            (local, torch.zeros_like(global_), previous),
            (local, global_, torch.zeros_like(previous)),
        ):
            assert not torch.allclose(block(*changed), out)
        first = _block(first=True)
        assert first(local, global_, None).shape == local.shape


def test_loss_falls_on_a_separable_problem():
    torch.manual_seed(0)
    assert_loss_falls_on_separable_images(HiFuse(2, size=TINY), lr=3e-3)


def test_hifuse_encoders_inside_the_concatenation_baseline(tmp_path):
    _, batch = tiny_example()
    torch.manual_seed(0)
    model = create_model("cmus_concat", num_classes=3, encoder="test_hifuse", hidden_dim=8)
    assert all(isinstance(e, HiFuse) for e in model.encoders.values())
    assert model.num_features == 3 * 96
    logits = model(batch)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, batch["label"]).backward()
    for modality, encoder in model.encoders.items():
        for branch in (encoder.local_branch, encoder.global_branch, encoder.fusions):
            grads = [p.grad for p in branch.parameters() if p.grad is not None]
            assert any(g.abs().sum() > 0 for g in grads), modality
    # a local state dict of the encoder loads through the shared checkpoint loader
    path = tmp_path / "hifuse.pt"
    torch.save(model.encoders["OM"].state_dict(), path)
    loaded = create_model(
        "cmus_concat", encoder="test_hifuse", modalities=["OM"], hidden_dim=8, checkpoint=str(path)
    )
    for name, tensor in loaded.encoders["OM"].state_dict().items():
        torch.testing.assert_close(tensor, model.encoders["OM"].state_dict()[name], msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="hifuse_tiny"):
        create_hifuse_encoder("hifuse_huge")
    with pytest.raises(ValueError, match="num_classes"):
        HiFuse(-1, size=TINY)
    with pytest.raises(ValueError, match="cmus_concat"):
        CMUSNet(encoder="test_hifuse")
