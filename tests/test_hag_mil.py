"""HAG-MIL (Xiong et al., IJCAI 2023) as a CS-MIL baseline: the 5x -> 10x -> 20x zoom, its
losses, deterministic evaluation, learning and a CS-MIL fold."""

import pandas as pd
import pytest
import torch

from mmdiag.models import create_model
from mmdiag.models.hag_mil import keep_most_attended
from tests.mil_bags import assert_learns_planted_bags
from tests.test_csmil_fold import N_PATCHES, _run, cohort  # noqa: F401

SMALL = {"hidden_dims": (16, 8), "pool_dim": 8, "attention_dim": 4, "heads": 2, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small(**options):
    torch.manual_seed(0)
    return create_model("hag_mil", in_dim=8, **(SMALL | options))


def _batch(n_bags=4, n_locations=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n_bags, n_locations, dtype=torch.bool)
    mask[0, 5:] = False
    return {
        "features": torch.randn(n_bags, n_locations, 3, 8, generator=generator),
        "mask": mask,
        "label": (torch.arange(n_bags) % 2).float(),
    }


def test_each_level_keeps_the_most_attended_real_locations():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 9.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    mask = torch.tensor([[True, True, True, True, False], [True] * 5])
    kept = keep_most_attended(scores, mask, 0.5)
    # 4 real -> 2 kept (padding never, however high); 5 real -> ceil(2.5) = 3
    assert kept.tolist() == [[False, True, False, True, False], [True, True, True, False, False]]
    assert keep_most_attended(scores[:1], mask[:1], 0.01).sum() == 1  # at least one


def test_the_zoom_reads_coarse_to_fine_and_only_the_kept_locations():
    model, batch = _small().eval(), _batch()
    with torch.no_grad():
        levels = model.forward_levels(batch)
        logit = model(batch)
    masks = [level["mask"] for level in levels]
    assert torch.equal(masks[0], batch["mask"])
    assert (masks[1].sum(1) == torch.tensor([3, 4, 4, 4])).all()  # ceil(5/2), 8/2
    assert (masks[2].sum(1) == torch.tensor([2, 2, 2, 2])).all()
    assert (masks[2] <= masks[1]).all() and (masks[1] <= masks[0]).all()
    # a location the 20x level does not read: its 20x and 10x features change nothing there
    unread = ~masks[1][1] & batch["mask"][1]
    changed = dict(batch, features=batch["features"].clone())
    changed["features"][1, unread, :2] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(model(changed), logit)
    attention = model.attention(batch)
    assert attention["level_attention"].shape == (4, 8, 3)
    assert (attention["instance"][~masks[2]] == 0).all()
    torch.testing.assert_close(attention["instance"].sum(1), torch.ones(4))


def test_evaluation_is_deterministic_and_reads_no_label():
    model, batch = _small(dropout=0.25).eval(), _batch()
    with torch.no_grad():
        first = model(batch)
        assert torch.equal(first, model(batch))
        assert torch.equal(first, model({k: v for k, v in batch.items() if k != "label"}))
        assert torch.equal(first, model(batch | {"label": 1 - batch["label"]}))


def test_the_loss_sums_three_levels_and_every_level_learns():
    model, batch = _small(), _batch()
    loss, logits = model.loss(batch)
    assert logits.shape == (4,) and loss.ndim == 0
    loss.backward()
    for level in model.levels:
        assert level.head.weight.grad.abs().sum() > 0
        assert any(c.weight.grad is not None for c in level.instance_classifiers)
    # no gradient crosses levels: each level's loss reaches its own IAT only
    model.zero_grad()
    model.forward_levels(batch)[-1]["logit"].sum().backward()
    assert all(p.grad is None for p in model.levels[0].parameters())


def test_options_are_checked():
    with pytest.raises(ValueError, match="keep_fraction"):
        _small(keep_fraction=0.0)
    with pytest.raises(ValueError, match="heads"):
        _small(heads=3)


def test_it_learns_a_label_carried_by_a_few_planted_instances():
    assert_learns_planted_bags(_small(), steps=30)


def test_a_csmil_fold_trains_and_tests_hag_mil(cohort, tmp_path):  # noqa: F811
    from tests.test_csmil_fold import _method

    settings = _method({"csmil": None})
    settings["train"]["lr"] = 1e-2
    settings["variants"] = {
        "hag_mil": {"model": "hag_mil", "clustering": True, "cluster_scale": None}
        | {"options": SMALL}
    }
    metrics = _run(cohort, "hag_mil", settings, tmp_path)
    out = tmp_path / "hag_mil" / "fold_0"
    predictions = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(predictions) == 9 and {"AUC", "AP"} <= set(metrics)
    assert len(pd.read_csv(out / "attention.tsv", sep="\t")) == 9 * N_PATCHES
    assert _run(cohort, "hag_mil", settings, tmp_path / "again") == metrics
