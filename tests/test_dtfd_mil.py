"""DTFD-MIL (Zhang et al., CVPR 2022) as a CS-MIL baseline: pseudo-bags, the four distillation
strategies, the Grad-CAM instance signal, deterministic evaluation, learning and a CS-MIL fold."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmdiag.models import create_model
from mmdiag.models.dtfd import DISTILLATIONS, distil, pseudo_bag_membership
from tests.mil_bags import assert_learns_planted_bags
from tests.test_csmil_fold import CLASSES, DIM, N_PATCHES, _run, cohort  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n_bags=4, n_locations=6, dim=8, seed=0, labels=None):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n_bags, n_locations, dtype=torch.bool)
    mask[0, 4:] = False
    labels = torch.arange(n_bags) % 2 if labels is None else torch.as_tensor(labels)
    return {
        "features": torch.randn(n_bags, n_locations, 3, dim, generator=generator),
        "mask": mask,
        "label": labels.float(),
    }


def _small(**options):
    return create_model("dtfd_mil", in_dim=8, reduce_dim=16, attention_dim=8, **options)


# --------------------------------------------------------------------------- pseudo-bags


@pytest.mark.parametrize("n_pseudo_bags", [1, 3, 4, 9])
@pytest.mark.parametrize("seeded", [False, True])
def test_pseudo_bags_hold_every_real_instance_exactly_once(n_pseudo_bags, seeded):
    torch.manual_seed(1)
    mask = torch.rand(20, 11) < 0.7
    mask[:, 0] = True
    generator = torch.Generator().manual_seed(3) if seeded else None
    membership = pseudo_bag_membership(mask, n_pseudo_bags, generator=generator)
    assert membership.shape == (20, n_pseudo_bags, 11)
    assert torch.equal(membership.sum(dim=1), mask.long())  # once each; padding never
    sizes = membership.sum(dim=2)
    assert (sizes.max(dim=1).values - sizes.min(dim=1).values <= 1).all()
    assert torch.equal(sizes.sum(dim=1), mask.sum(dim=1))


def test_training_splits_are_random():
    mask = torch.ones(1, 12, dtype=torch.bool)
    splits = {tuple(pseudo_bag_membership(mask, 4)[0].int().argmax(0).tolist()) for _ in range(10)}
    assert len(splits) > 1


def test_the_eval_split_of_a_bag_ignores_the_padding_the_batch_adds():
    def seeded():
        return torch.Generator().manual_seed(0)

    alone = torch.ones(1, 70, dtype=torch.bool)
    padded = torch.zeros(2, 200, dtype=torch.bool)
    padded[0, :70], padded[1] = True, True
    first = pseudo_bag_membership(alone, 4, generator=seeded())[0]
    in_batch = pseudo_bag_membership(padded, 4, generator=seeded())[0, :, :70]
    assert torch.equal(first, in_batch)


# --------------------------------------------------------------------------- distillation


def _tiny_bag():
    """One bag, one pseudo-bag of three instances, attention (0.2, 0.3, 0.5) and classifier
    weight w = (1, -1): instance logits w^T (a_k h_k) = (0.2, -0.3, 0)."""
    instances = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    attention = torch.tensor([[[0.2, 0.3, 0.5]]])
    weight = torch.tensor([1.0, -1.0])
    instance_logit = attention.sum(1) * (instances @ weight)
    membership = torch.ones(1, 1, 3, dtype=torch.bool)
    return instances, attention, instance_logit, membership


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("AFS", [[1.2, 1.3]]),  # 0.2 (1, 0) + 0.3 (0, 1) + 0.5 (2, 2)
        ("MaxS", [[1.0, 0.0]]),  # highest p_k: instance 0 (logit 0.2)
        ("MaxMinS", [[1.0, 0.0], [0.0, 1.0]]),  # and lowest: instance 1 (logit -0.3)
        ("MAS", [[2.0, 2.0]]),  # highest attention: instance 2 (0.5)
    ],
)
def test_each_distillation_strategy_on_a_hand_computed_bag(strategy, expected):
    instances, attention, instance_logit, membership = _tiny_bag()
    torch.testing.assert_close(instance_logit, torch.tensor([[0.2, -0.3, 0.0]]))
    features, mask = distil(strategy, instances, attention, instance_logit, membership)
    torch.testing.assert_close(features, torch.tensor([expected]))
    assert mask.all()


def test_an_empty_pseudo_bag_gives_masked_distilled_slots():
    instances = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    membership = torch.tensor([[[True, False], [False, True], [False, False]]])
    attention = membership.float()
    logit = torch.tensor([[0.5, -0.5]])
    for strategy in DISTILLATIONS:
        _, mask = distil(strategy, instances, attention, logit, membership, per_pseudo_bag=2)
        per_pseudo_bag = mask.reshape(3, -1)
        assert not per_pseudo_bag[2].any(), strategy
        assert per_pseudo_bag[0].any() and per_pseudo_bag[1].any(), strategy


def test_the_instance_signal_is_the_grad_cam_of_the_tier1_classifier():
    torch.manual_seed(0)
    model = _small(scale_input="single")
    instances = model.reduce(torch.randn(2, 7, 8))
    membership = pseudo_bag_membership(torch.ones(2, 7, dtype=torch.bool), 3)
    tier1 = model.tier1(instances, membership)
    weighted = (tier1["attention"][..., None] * instances[:, None]).detach().requires_grad_()
    logits = model.tier1_classifier(weighted.sum(dim=2)).squeeze(-1)
    (gradient,) = torch.autograd.grad(logits.sum(), weighted)  # d s_m / d(a_k h_k) = w
    grad_cam = (gradient * weighted).sum(dim=-1).sum(dim=1)  # each instance in one pseudo-bag
    torch.testing.assert_close(tier1["instance_logit"], grad_cam)
    torch.testing.assert_close(tier1["pseudo_bag_logit"], logits)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize(
    ("strategy", "slots"), [("AFS", 1), ("MaxS", 2), ("MAS", 2), ("MaxMinS", 4)]
)
def test_output_shapes(strategy, slots):
    model = _small(distillation=strategy, n_pseudo_bags=3, instances_per_pseudo_bag=2)
    batch = _batch()
    features = model.forward_features(batch)
    assert model(batch).shape == (4,)
    assert features["bag"].shape == (4, 16)
    assert features["pseudo_bag_logit"].shape == features["pseudo_bag_mask"].shape == (4, 3)
    assert features["instance"].shape == features["instance_probability"].shape == (4, 6)
    assert features["instance_scale"].shape == (4, 6, 3)
    torch.testing.assert_close(features["instance"].sum(dim=1), torch.ones(4))
    assert (features["instance"][0, 4:] == 0).all()  # padding
    reduced = model.reduce(batch["features"].reshape(4, 18, 8))
    membership = pseudo_bag_membership(batch["mask"].repeat_interleave(3, dim=1), 3)
    tier1 = model.tier1(reduced, membership)
    distilled, mask = distil(
        strategy, reduced, tier1["attention"], tier1["instance_logit"], membership,
        per_pseudo_bag=2,
    )  # fmt: skip
    assert distilled.shape == (4, 3 * slots, 16) and mask.shape == (4, 3 * slots)


@pytest.mark.parametrize("scale_input", ["single", "sum", "concat", "instances"])
def test_every_scale_input_runs(scale_input):
    model = _small(scale_input=scale_input)
    loss, logits = model.loss(_batch())
    assert logits.shape == (4,) and torch.isfinite(loss)


def test_evaluation_is_deterministic_reads_no_label_and_changes_no_state():
    torch.manual_seed(0)
    model = _small(distillation="MaxMinS").eval()
    batch = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(batch), model(batch)
        permuted = model(batch | {"label": batch["label"].flip(0)})
        unlabelled = model({k: v for k, v in batch.items() if k != "label"})
        attention = model.attention(batch)
    assert torch.equal(first, second) and torch.equal(first, permuted)
    assert torch.equal(first, unlabelled)
    assert torch.equal(attention["instance"], model.attention(batch)["instance"])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # one bag alone scores as it does among others
    alone = {k: v[1:2] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(alone), first[1:2])


def test_tier2_loss_does_not_reach_tier1():
    model = _small()
    features = model.forward_features(_batch())
    model.forward_head(features).sum().backward()
    assert all(p.grad is None for p in model.reduce.parameters())
    assert all(p.grad is not None for p in model.tier2_attention.parameters())


def test_gradients_are_clipped_per_module():
    model = _small(grad_clip=5.0)
    loss, _ = model.loss(_batch())
    (1e4 * loss).backward()
    model.clip_gradients()
    for module in (model.reduce, model.tier1_attention, model.tier1_classifier):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
        assert norm <= 5.0 + 1e-4


@pytest.mark.parametrize("strategy", ["AFS", "MaxMinS"])
def test_it_learns_a_label_carried_by_a_few_planted_instances(strategy):
    torch.manual_seed(0)
    assert_learns_planted_bags(_small(distillation=strategy), steps=40)


def test_options_are_checked():
    with pytest.raises(ValueError, match="distillation"):
        _small(distillation="MinS")
    with pytest.raises(ValueError, match="scale_input"):
        _small(scale_input="stack")
    with pytest.raises(ValueError, match="n_pseudo_bags"):
        _small(n_pseudo_bags=0)


# --------------------------------------------------------------------------- a CS-MIL fold


def test_a_csmil_fold_trains_and_tests_dtfd_mil(cohort, tmp_path):  # noqa: F811
    from tests.test_csmil_fold import _method

    settings = _method({"csmil": None})
    settings["train"]["lr"] = 1e-2  # 12 epochs on 18 slides
    options = {"reduce_dim": 32, "attention_dim": 16}
    settings["variants"] = {
        "dtfd_mil": {"model": "dtfd_mil", "clustering": True, "cluster_scale": None}
        | {"options": options}
    }
    metrics = _run(cohort, "dtfd_mil", settings, tmp_path)
    out = tmp_path / "dtfd_mil" / "fold_0"
    predictions = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(predictions) == 9 and set(predictions["variant"]) == {"dtfd_mil"}
    assert {"AUC", "AP"} <= set(metrics) and metrics["AUC"] >= 0.7, metrics
    attention = pd.read_csv(out / "attention.tsv", sep="\t")
    assert len(attention) == 9 * N_PATCHES
    fresh = create_model("dtfd_mil", in_dim=DIM, **options)
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))  # strict: same model
    # the fold is reproducible: the test bags' pseudo-bag splits are fixed
    assert _run(cohort, "dtfd_mil", settings, tmp_path / "again") == metrics
