"""CMUS-Net: SMIL (eqs. 3-7), CMSA (eqs. 8-10), the weighted loss (eqs. 13-15) and variants."""

import math

import pytest
import torch
from torch.nn import functional as F

from mmdiag.models import create_model
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


def test_smil_inverse_distance_weights():
    # centre 0 at the origin; others at distance 1 and 2 (none cut): weights 2/3 and 1/3
    features = torch.tensor([[0.0], [1.0], [-2.0]])
    sums = [3.0, 4.0, 5.0]  # distance sums -> centre is instance 0
    assert min(range(3), key=sums.__getitem__) == 0
    torch.testing.assert_close(
        sparse_mil_aggregate(features, t=1.5), torch.tensor([0 + 2 / 3 * 1 + 1 / 3 * -2])
    )


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
