"""CS-MIL, its baselines and ablations: shapes, masking, scale handling, references, learning."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from mmdiag.models.csmil import PAPER_VARIANTS, CrossScaleMIL
from mmdiag.models.registry import create_model, list_models

IN_DIM = 6
MI_FCN_2048 = 2048 * 64 + 64  # one E_MS at the paper's sizes


def _batch(n_bags=3, n=5, scales=3, dim=IN_DIM, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n_bags, n, dtype=torch.bool)
    mask[0, 3:] = False  # bag 0 has two padded instances, bag 2 one
    mask[2, 0] = False
    return {
        "features": torch.randn(n_bags, n, scales, dim, generator=generator),
        "mask": mask,
        "label": (torch.arange(n_bags) % 2).float(),
    }


def _model(variant, seed=0, **overrides):
    torch.manual_seed(seed)
    spec = PAPER_VARIANTS[variant]
    return create_model(spec.model, in_dim=IN_DIM, **(spec.options | overrides)).eval()


def _n_parameters(model):
    return sum(p.numel() for p in model.parameters())


def test_every_method_is_registered():
    assert {"csmil", "deepattnmisl", "gated_attention", "ms_da_mil", "ds_mil"} <= set(list_models())


@pytest.mark.parametrize("variant", list(PAPER_VARIANTS))
def test_every_variant_runs_forward_and_backward(variant):
    model = _model(variant).train()
    batch = _batch()
    loss, logits = model.loss(batch)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.named_parameters():
        if name == "pooling.weight.bias":  # a softmax is blind to a shared shift of its scores
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", list(PAPER_VARIANTS))
def test_instance_attention_sums_to_one_and_is_zero_on_padding(variant):
    batch = _batch()
    attention = _model(variant).attention(batch)
    instance = attention["instance"]
    assert instance.shape == (3, 5)
    torch.testing.assert_close(instance.sum(dim=1), torch.ones(3))
    assert (instance[~batch["mask"]] == 0).all()
    assert (instance[batch["mask"]] > 0).all()
    if PAPER_VARIANTS[variant].model == "csmil":
        assert attention["scale"].shape == (3, 5, 3)


@pytest.mark.parametrize("variant", list(PAPER_VARIANTS))
def test_padded_features_never_reach_the_output(variant):
    model, batch = _model(variant), _batch()
    garbage = dict(batch, features=batch["features"].clone())
    padding = ~batch["mask"]
    garbage["features"][padding] = 1e4 * torch.randn(int(padding.sum()), 3, IN_DIM)
    with torch.no_grad():
        assert torch.equal(model(batch), model(garbage))


@pytest.mark.parametrize("variant", list(PAPER_VARIANTS))
def test_instance_order_does_not_matter(variant):
    model, batch = _model(variant), _batch()
    order = torch.tensor([4, 2, 0, 3, 1])
    shuffled = dict(batch, features=batch["features"][:, order], mask=batch["mask"][:, order])
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(shuffled))


def test_scale_attention_is_a_softmax_over_scales_only_with_the_option():
    batch = _batch()
    scale = _model("CS-MIL").attention(batch)["scale"]
    torch.testing.assert_close(scale.sum(dim=-1), torch.ones(3, 5))
    assert (scale > 0).all()
    raw = _model("CS-MIL", scale_softmax=False).attention(batch)["scale"]
    assert not torch.allclose(raw.sum(dim=-1), torch.ones(3, 5), atol=1e-2)
    # the same parameters: the raw scores are the softmax's logits
    torch.testing.assert_close(torch.softmax(raw, dim=-1), scale)


def test_scale_activation_picks_relu_or_tanh():
    relu, tanh = _model("CS-MIL"), _model("Sharing, Tanh")
    assert isinstance(relu.scale_attention.score[1], torch.nn.ReLU)
    assert isinstance(tanh.scale_attention.score[1], torch.nn.Tanh)
    with pytest.raises(ValueError, match="scale_activation"):
        create_model("csmil", scale_activation="gelu")


@pytest.mark.parametrize("scale_index", [0, 1, 2])
def test_single_scale_deepattnmisl_reads_only_its_scale(scale_index):
    model, batch = _model("DeepAttnMISL(20x)", scale_index=scale_index), _batch()
    others = [s for s in range(3) if s != scale_index]
    changed = dict(batch, features=batch["features"].clone())
    changed["features"][:, :, others] = torch.randn(3, 5, 2, IN_DIM)
    own = dict(batch, features=batch["features"].clone())
    own["features"][:, :, scale_index] += 1.0
    with torch.no_grad():
        assert torch.equal(model(batch), model(changed))
        assert not torch.allclose(model(batch), model(own))


def test_parameter_counts_match_table_6_and_the_sharing_ablation():
    ungated = {"gated": False}  # the pooling of the authors' code, which Table 6 counts
    assert _n_parameters(create_model("deepattnmisl", **ungated)) == 135_362
    assert _n_parameters(create_model("ms_da_mil", **ungated)) == 135_362
    shared = _n_parameters(create_model("csmil", **ungated))
    assert shared == 137_475
    unshared = _n_parameters(create_model("csmil", shared_encoder=False, **ungated))
    assert unshared - shared == 2 * MI_FCN_2048  # one more E_MS per extra scale
    gate = 64 * 32 + 32  # U of the gated attention
    assert _n_parameters(create_model("csmil")) == shared + gate


def test_mean_fusion_is_the_explicit_average_of_the_shared_encoder():
    model, batch = _model("Mean-vector"), _batch()
    features = batch["features"] * batch["mask"][:, :, None, None]
    encoded = F.relu(model.encoder.fc(features))  # f_s = E_MS(F_s), eq. 2
    average = (encoded[:, :, 0] + encoded[:, :, 1] + encoded[:, :, 2]) / 3
    bag, _ = model.pooling(average, batch["mask"])
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.head(bag).squeeze(-1))


def test_uniform_cross_scale_attention_equals_mean_fusion():
    attention = _model("CS-MIL")
    with torch.no_grad():  # equal scores for every scale: a_s = 1/3
        attention.scale_attention.score[2].weight.zero_()
    mean = _model("Mean-vector", seed=1)
    mean.load_state_dict(attention.state_dict(), strict=False)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(attention(batch), mean(batch))
    torch.testing.assert_close(attention.attention(batch)["scale"], torch.full((3, 5, 3), 1 / 3))


def test_concat_fusion_pools_all_scales_side_by_side():
    model = _model("Concatenation")
    assert model.num_features == 3 * 64
    assert not hasattr(model, "scale_attention")
    torch.testing.assert_close(model.attention(_batch())["scale"], torch.full((3, 5, 3), 1 / 3))


def test_ms_da_mil_adds_the_scales_before_deepattnmisl():
    ms_da_mil, single = _model("MS-DA-MIL"), _model("DeepAttnMISL(20x)", seed=1)
    single.load_state_dict(ms_da_mil.state_dict())
    batch = _batch()
    summed = dict(batch, features=batch["features"].sum(dim=2, keepdim=True).repeat(1, 1, 3, 1))
    with torch.no_grad():
        torch.testing.assert_close(ms_da_mil(batch), single(summed))


@pytest.mark.parametrize("variant", ["Gated Attention", "DeepAttnMISL"])
def test_pooled_scales_are_independent_instances(variant):
    model, batch = _model(variant), _batch()
    attention = model.attention(batch)
    torch.testing.assert_close(attention["instance"], attention["instance_scale"].sum(dim=-1))
    assert (attention["instance_scale"][~batch["mask"]] == 0).all()
    swapped = dict(batch, features=batch["features"][:, :, [2, 0, 1]])
    with torch.no_grad():  # a set of N * S instances: the scale order does not matter
        torch.testing.assert_close(model(batch), model(swapped))


def _csmil_reference(model: CrossScaleMIL, features, mask):
    """Eqs. 2-5 for one bag at a time, on its real instances only."""
    logits = []
    for bag_features, bag_mask in zip(features, mask, strict=True):
        fused = []
        for location in bag_features[bag_mask]:
            f = [F.relu(model.encoder.fc(location[s])) for s in range(3)]  # eq. 2
            scores = torch.stack([model.scale_attention.score(f_s)[0] for f_s in f])
            a = torch.exp(scores) / torch.exp(scores).sum()  # eq. 3
            fused.append(sum(a_s * f_s for a_s, f_s in zip(a, f, strict=True)))  # eq. 4
        h = torch.stack(fused)
        pool = model.pooling
        score = pool.weight(torch.tanh(pool.tanh_branch(h)) * torch.sigmoid(pool.gate(h)))
        weights = torch.softmax(score[:, 0], dim=0)
        logits.append(model.head((weights[:, None] * h).sum(dim=0))[0])  # eq. 5
    return torch.stack(logits)


def test_csmil_matches_a_per_bag_reference_of_the_equations():
    model = _model("CS-MIL")
    for seed in range(5):
        batch = _batch(seed=seed)
        with torch.no_grad():
            expected = _csmil_reference(model, batch["features"], batch["mask"])
            torch.testing.assert_close(model(batch), expected)


def _ds_mil_reference(model, features, mask):
    """DS-MIL for one bag at a time, as Li et al.'s code computes it."""
    logits = []
    for bag_features, bag_mask in zip(features, mask, strict=True):
        h = bag_features[bag_mask].flatten(1)  # concatenated scales
        c = model.instance_classifier(h)[:, 0]
        critical = int(torch.argmax(c))
        q = model.query(h)
        a = torch.softmax(q @ q[critical] / math.sqrt(q.shape[1]), dim=0)
        bag_logit = model.bag_classifier((a[:, None] * h).sum(dim=0))[0]
        logits.append((c[critical] + bag_logit) / 2)
    return torch.stack(logits)


def test_ds_mil_matches_a_per_bag_reference():
    model = _model("DS-MIL")
    for seed in range(5):
        batch = _batch(seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(
                model(batch), _ds_mil_reference(model, batch["features"], batch["mask"])
            )


def test_ds_mil_loss_averages_the_two_streams():
    model, batch = _model("DS-MIL"), _batch()
    loss, logits = model.loss(batch)
    features = model.forward_features(batch)
    max_logit, bag_logit = model.stream_logits(features)
    expected = (
        F.binary_cross_entropy_with_logits(max_logit, batch["label"])
        + F.binary_cross_entropy_with_logits(bag_logit, batch["label"])
    ) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, (max_logit + bag_logit) / 2)


def test_bad_batches_and_options_are_refused():
    batch = _batch()
    empty = dict(batch, mask=batch["mask"].clone())
    empty["mask"][1] = False
    with pytest.raises(ValueError, match="at least one real instance"):
        _model("CS-MIL")(empty)
    two_scales = dict(batch, features=batch["features"][:, :, :2])
    with pytest.raises(ValueError, match="3 scales"):
        _model("CS-MIL")(two_scales)
    with pytest.raises(ValueError, match="scale_index"):
        _model("DeepAttnMISL(20x)", scale_index=3)(batch)
    with pytest.raises(ValueError, match="fusion"):
        create_model("csmil", fusion="max")


def _toy_bags(n_bags, seed, n=8, dim=8):
    """Label 1 iff one instance carries a marker in its 5x features; 20x and 10x are noise."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_bags, n, 3, dim, generator=generator)
    label = (torch.arange(n_bags) % 2).float()
    key = torch.randint(0, n, (n_bags,), generator=generator)
    features[torch.arange(n_bags), key, 2, 0] += 4.0 * label
    return {"features": features, "mask": torch.ones(n_bags, n, dtype=torch.bool), "label": label}


def _test_auc(name, **options):
    torch.manual_seed(0)
    model = create_model(name, in_dim=8, **options)
    train, test = _toy_bags(128, seed=1), _toy_bags(256, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        optimizer.zero_grad()
        model.loss(train)[0].backward()
        optimizer.step()
    with torch.no_grad():
        return roc_auc_score(test["label"].numpy(), model.eval()(test).numpy())


@pytest.fixture
def one_thread():
    """Tiny training runs are fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_csmil_learns_a_5x_signal_that_20x_alone_cannot_see(one_thread):
    assert _test_auc("csmil") > 0.8
    assert 0.35 < _test_auc("deepattnmisl", scale_index=0) < 0.65
