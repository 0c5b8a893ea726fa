"""CMUS-Net: SMIL (eqs. 3-7), CMSA (eqs. 8-10), the weighted loss (eqs. 13-15) and variants."""

import math

import pytest
import timm
import torch
from torch.nn import functional as F

from mmdiag.models import cmus, create_model
from mmdiag.models.cmus import (
    FUSION_ATTENTIONS,
    CrossModalScaleAttention,
    sparse_mil_aggregate,
    token_map,
)
from mmdiag.models.encoders import create_encoder


def test_smil_hand_computed_example():
    # four instances on a line at 0, 1, 2, 10:
    # distance sums 13, 11, 11, 27 -> central instance 1 (first of the tie)
    # mean pairwise distance 31/6, cut at 1.5 * 31/6 = 7.75 -> instance 3 (distance 9) is dropped
    # distances to the centre 1 and 1 -> weights 1/2, 1/2; f' = f1 + (f0 + f2) / 2 = (2, 0)
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]], requires_grad=True)
    aggregate = sparse_mil_aggregate(features, t=1.5)
    torch.testing.assert_close(aggregate, torch.tensor([2.0, 0.0]))
    aggregate.sum().backward()
    # gradients flow through the selected features with the (constant) weights
    torch.testing.assert_close(features.grad[:, 0], torch.tensor([0.5, 1.0, 0.5, 0.0]))


def _smil_by_hand(points, t):
    """Eqs. 4-7 instance by instance: the centre, the instances kept and f'."""
    n = len(points)
    distance = [[math.dist(p, q) for q in points] for p in points]  # eq. 4: Euclidean
    centre = min(range(n), key=lambda i: sum(distance[i]))  # least total distance
    pairs = [distance[i][j] for i in range(n) for j in range(i + 1, n)]
    cut = t * sum(pairs) / len(pairs)  # eq. 5: t times the mean pairwise distance
    kept = [i for i in range(n) if i != centre and distance[centre][i] <= cut]  # eq. 6
    inverse = {i: 1 / distance[centre][i] for i in kept}  # eq. 7: inverse distance to the centre
    aggregate = list(points[centre])
    for i in kept:
        for k in range(len(aggregate)):
            aggregate[k] += inverse[i] / sum(inverse.values()) * points[i][k]
    return centre, kept, aggregate


def test_smil_inverse_distance_weights():
    # instance 0 is central; 1, 2, 3 at distances 2, 1, sqrt(5) from it; 4 is far (10)
    points = [(1.0, 1.0), (3.0, 1.0), (1.0, 2.0), (0.0, -1.0), (9.0, 7.0)]
    features = torch.tensor(points)
    for t, kept_by_hand in ((1.5, [1, 2, 3]), (2.0, [1, 2, 3, 4])):  # the cut drops 4, or not
        centre, kept, expected = _smil_by_hand(points, t)
        assert centre == 0 and kept == kept_by_hand
        actual = sparse_mil_aggregate(features, t=t)
        torch.testing.assert_close(actual, torch.tensor(expected))
    centre, kept, expected = _smil_by_hand(points, 1.5)
    alternatives = {
        "the centre alone": features[centre],
        "equal weights": features[centre] + features[kept].mean(dim=0),
        "no outlier cut": torch.tensor(_smil_by_hand(points, 2.0)[2]),
        "the kept instances alone": torch.tensor(expected) - features[centre],
    }
    for name, wrong in alternatives.items():  # the bag tells them apart
        assert (torch.tensor(expected) - wrong).abs().max() > 0.1, name


def test_smil_works_on_token_maps_and_flattens_them():
    features = torch.randn(5, 4, 3)
    out = sparse_mil_aggregate(features)
    assert out.shape == (4, 3)
    flat = sparse_mil_aggregate(features.reshape(5, 12)).reshape(4, 3)
    torch.testing.assert_close(out, flat)


def test_smil_edge_cases_are_finite_and_documented():
    single = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(sparse_mil_aggregate(single), single[0])
    pair = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(sparse_mil_aggregate(pair), pair[0] + pair[1])  # weight 1
    duplicates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    for t in (1.4, 1.6):  # the far instance cut, or kept: duplicates take the whole weight
        torch.testing.assert_close(sparse_mil_aggregate(duplicates, t=t), torch.tensor([2.0, 0.0]))
    identical = torch.ones(4, 3)
    torch.testing.assert_close(sparse_mil_aggregate(identical), 2 * torch.ones(3))
    outlier_only = torch.tensor([[0.0], [0.1], [100.0]])
    result = sparse_mil_aggregate(outlier_only, t=0.01)  # everything but the centre cut
    assert torch.isfinite(result).all()
    with pytest.raises(ValueError, match="at least one"):
        sparse_mil_aggregate(torch.zeros(0, 3))


def test_cmsa_matches_an_explicit_per_head_computation():
    torch.manual_seed(0)
    dim, heads, tokens = 8, 4, 5
    module = CrossModalScaleAttention(dim, heads)
    tem, other = torch.randn(2, tokens, dim), torch.randn(2, tokens, dim)
    q, k, v = module.query(tem), module.key(other), module.value(other)
    width = dim // heads
    outputs = []
    for h in range(heads):  # eq. 8, head by head
        part = slice(h * width, (h + 1) * width)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(dim / heads)
        outputs.append(scores.softmax(dim=-1) @ v[..., part])
    expected = torch.cat(outputs, dim=-1) + other  # eq. 9: heads concatenated + residual
    torch.testing.assert_close(module(tem, other), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        CrossModalScaleAttention(10, 4)


def test_token_map_layouts():
    images = torch.randn(2, 3, 64, 64)
    conv = create_encoder("test_resnet")
    assert token_map(conv, images).shape == (2, 4, conv.num_features)  # 2x2 grid
    vit = create_encoder("test_vit")
    tokens = token_map(vit, images)
    assert tokens.shape[1] == (64 // 16) ** 2  # class token dropped


def _small_swin(img_size):
    """timm's smallest Swin, randomly initialised, for ``img_size`` inputs (NHWC features)."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=img_size
    )


def test_token_map_flattens_swin_nhwc_features_row_major():
    torch.manual_seed(0)
    swin = _small_swin((96, 64)).eval()
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        features = swin.forward_features(images)
        tokens = token_map(swin, images)
    assert swin.output_fmt == "NHWC" and features.shape == (2, 3, 2, swin.num_features)
    assert tokens.shape == (2, 3 * 2, swin.num_features)  # (B, N, C) over a 3 x 2 grid
    row_major = torch.stack([features[:, i, j] for i in range(3) for j in range(2)], dim=1)
    torch.testing.assert_close(tokens, row_major)
    channels_first = features.permute(0, 3, 1, 2)  # the same map as a (B, C, H, W) encoder's
    torch.testing.assert_close(tokens, channels_first.flatten(2).transpose(1, 2))


def test_cmus_net_runs_on_a_swin_encoder(monkeypatch):
    names = []

    def swin_encoder(name, *, checkpoint=None):
        names.append(name)
        return _small_swin(64)

    monkeypatch.setattr(cmus, "create_encoder", swin_encoder)
    torch.manual_seed(0)
    model = create_model("cmus_net", encoder="swin_tiny_patch4_window7_224", hidden_dim=16)
    assert names == ["swin_tiny_patch4_window7_224"] * 3  # one encoder per modality
    batch = _batch(64)
    tokens = model.encode(batch)
    assert all(t.shape == (2, 2 * 2, 768) for t in tokens.values())  # 2 x 2 grid of 64 / 32
    loss, logits = model.loss(batch)
    assert logits.shape == (2, 3) and torch.isfinite(loss)


def _batch(size=64):
    generator = torch.Generator().manual_seed(1)
    return {
        "om": torch.randn(2, 3, size, size, generator=generator),
        "im": torch.randn(2, 3, size, size, generator=generator),
        "tem": torch.randn(5, 3, size, size, generator=generator),
        "tem_patient": torch.tensor([0, 0, 1, 1, 1]),
        "label": torch.tensor([0, 2]),
    }


@pytest.mark.parametrize("fusion_attention", FUSION_ATTENTIONS)
@pytest.mark.parametrize(
    "modalities", [("OM", "IM", "TEM"), ("OM", "TEM"), ("IM", "TEM"), ("OM", "IM"), ("TEM",)]
)
def test_every_variant_runs_forward_and_backward(fusion_attention, modalities):
    model = create_model(
        "cmus_net", encoder="test_resnet", fusion_attention=fusion_attention, modalities=modalities
    )
    loss, logits = model.loss(_batch())
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    loss.backward()
    for modality in modalities:
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0
            for p in model.encoders[modality].parameters()
        )


def test_weighted_loss_is_eq_15():
    torch.manual_seed(0)
    batch = _batch()
    model = create_model("cmus_net", encoder="test_resnet", hidden_dim=16).eval()
    loss, logits = model.loss(batch)
    pooled = model.forward_features(batch)
    expected = F.cross_entropy(logits, batch["label"])
    for modality, weight in {"OM": 0.3, "IM": 0.5, "TEM": 0.2}.items():
        modality_logits = model.modality_heads[modality](pooled[modality])
        expected = expected + weight * F.cross_entropy(modality_logits, batch["label"])
    torch.testing.assert_close(loss, expected)
    plain = create_model("cmus_net", encoder="test_resnet", weighted_loss=False).eval()
    loss, logits = plain.loss(batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["label"]))


def test_smil_switch_changes_the_tem_aggregate():
    torch.manual_seed(0)
    batch = _batch()
    with_smil = create_model("cmus_net", encoder="test_resnet", smil=True).eval()
    without = create_model("cmus_net", encoder="test_resnet", smil=False).eval()
    without.load_state_dict(with_smil.state_dict())
    with torch.no_grad():
        tokens = token_map(with_smil.encoders["TEM"], batch["tem"])
        expected_mean = tokens[2:].mean(dim=0)
        expected_smil = sparse_mil_aggregate(tokens[2:])
        torch.testing.assert_close(without.encode(batch)["TEM"][1], expected_mean)
        torch.testing.assert_close(with_smil.encode(batch)["TEM"][1], expected_smil)


def test_fusion_uses_the_papers_concatenation_order():
    model = create_model("cmus_net", encoder="test_resnet", hidden_dim=8).eval()
    pooled = {m: torch.randn(2, model.encoders[m].num_features) for m in ("OM", "IM", "TEM")}
    expected = model.head(torch.cat([pooled["OM"], pooled["TEM"], pooled["IM"]], dim=1))  # eq. 11
    torch.testing.assert_close(model.forward_head(pooled), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="fusion_attention"):
        create_model("cmus_net", encoder="test_resnet", fusion_attention="magic")
    with pytest.raises(ValueError, match="subset"):
        create_model("cmus_net", encoder="test_resnet", modalities=["CT"])
