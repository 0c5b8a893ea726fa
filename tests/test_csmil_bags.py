"""CS-MIL bag sampling: seeded, even over phenotype clusters, masked padding, and collation."""

import numpy as np
import pytest
import torch

from mmdiag.methods.csmil.bags import (
    BagScores,
    aggregate_bag_probabilities,
    collate_bags,
    sample_bag,
    sample_bags,
)
from mmdiag.models.csmil import csmil

# cluster sizes 40, 25, (2 absent), 60, 33; ids shuffled as k-means labels come
CLUSTERS = np.random.default_rng(7).permutation(np.repeat([0, 1, 3, 4], [40, 25, 60, 33]))
PRESENT = [0, 1, 3, 4]


def _counts(clusters, indices, mask):
    return np.bincount(clusters[indices[mask]], minlength=5)


def test_the_same_seed_gives_the_same_bag():
    first = sample_bag(CLUSTERS, 8, np.random.default_rng(3))
    again = sample_bag(CLUSTERS, 8, np.random.default_rng(3))
    other = sample_bag(CLUSTERS, 8, np.random.default_rng(4))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    many = sample_bags(CLUSTERS, 8, 20, np.random.default_rng(3))
    np.testing.assert_array_equal(
        many[0], sample_bags(CLUSTERS, 8, 20, np.random.default_rng(3))[0]
    )


@pytest.mark.parametrize("bag_size", [1, 4, 8, 10, 23])
def test_stratified_bags_draw_evenly_from_the_present_clusters(bag_size):
    rng = np.random.default_rng(0)
    for _ in range(200):
        indices, mask = sample_bag(CLUSTERS, bag_size, rng)
        assert indices.shape == mask.shape == (bag_size,)
        assert indices.dtype == np.int64 and mask.dtype == bool
        assert mask.all()  # every cluster is large enough: no padding
        counts = _counts(CLUSTERS, indices, mask)
        assert counts[2] == 0  # the absent cluster is never drawn
        assert counts.sum() == bag_size
        present = counts[PRESENT]
        assert present.max() - present.min() <= 1
        assert len(np.unique(indices)) == bag_size  # no patch twice in a bag


def test_the_extra_slots_go_to_every_cluster_alike():
    rng = np.random.default_rng(1)
    # 10 slots over 4 clusters: two clusters get 3; which ones must not favour low ids
    extra = sum(
        _counts(CLUSTERS, *sample_bag(CLUSTERS, 10, rng))[PRESENT] == 3 for _ in range(4000)
    )
    np.testing.assert_allclose(extra / 4000, 0.5, atol=0.04)


def test_patches_within_a_cluster_are_drawn_uniformly():
    rng = np.random.default_rng(2)
    hits = np.zeros(len(CLUSTERS))
    for _ in range(3000):
        indices, mask = sample_bag(CLUSTERS, 8, rng)
        np.add.at(hits, indices[mask], 1)
    for cluster in PRESENT:  # two slots per cluster and bag
        members = CLUSTERS == cluster
        expected = 3000 * 2 / members.sum()
        assert hits[members].mean() == pytest.approx(expected)  # exactly two per bag
        chi_square = ((hits[members] - expected) ** 2 / expected).sum()
        assert chi_square < members.sum() + 5 * np.sqrt(2 * members.sum())  # mean + 5 sd


def test_a_small_cluster_gives_all_it_has_and_the_rest_is_padding():
    clusters = np.array([5] + [1] * 50)  # cluster 5 holds one patch, cluster 1 fifty
    indices, mask = sample_bag(clusters, 8, np.random.default_rng(0))
    assert mask.tolist() == [True] * 5 + [False] * 3  # real instances first
    assert (indices[~mask] == 0).all()
    np.testing.assert_array_equal(np.bincount(clusters[indices[mask]], minlength=6)[[1, 5]], [4, 1])


def test_a_slide_with_few_patches_is_padded_not_repeated():
    indices, mask = sample_bag(np.array([0, 0, 1]), 8, np.random.default_rng(0))
    assert sorted(indices[mask].tolist()) == [0, 1, 2]
    assert mask.sum() == 3
    indices, mask = sample_bag(np.array([0, 0, 1]), 8, np.random.default_rng(0), stratified=False)
    assert sorted(indices[mask].tolist()) == [0, 1, 2]


def test_unstratified_bags_are_uniform_over_patches():
    rng = np.random.default_rng(5)
    n_bags = 4000
    hits = np.zeros(len(CLUSTERS))
    per_cluster = np.zeros(5)
    for _ in range(n_bags):
        indices, mask = sample_bag(CLUSTERS, 8, rng, stratified=False)
        assert mask.all() and len(np.unique(indices)) == 8
        np.add.at(hits, indices, 1)
        per_cluster += _counts(CLUSTERS, indices, mask)
    expected = n_bags * 8 / len(CLUSTERS)
    chi_square = ((hits - expected) ** 2 / expected).sum()
    assert chi_square < len(CLUSTERS) + 5 * np.sqrt(2 * len(CLUSTERS))  # mean + 5 sd
    sizes = np.bincount(CLUSTERS, minlength=5)
    np.testing.assert_allclose(per_cluster / per_cluster.sum(), sizes / sizes.sum(), atol=0.01)


def test_stratified_and_unstratified_bags_differ_in_cluster_share():
    rng = np.random.default_rng(6)
    clusters = np.array([0] * 95 + [1] * 5)
    stratified = sum(_counts(clusters, *sample_bag(clusters, 4, rng))[1] for _ in range(500))
    uniform = sum(
        _counts(clusters, *sample_bag(clusters, 4, rng, stratified=False))[1] for _ in range(500)
    )
    assert stratified == 500 * 2  # half of every bag from the small cluster
    assert uniform < 500 * 4 * 0.1


def test_test_time_bags_are_independent_rows():
    indices, mask = sample_bags(CLUSTERS, 8, 100, np.random.default_rng(0))
    assert indices.shape == mask.shape == (100, 8)
    assert len({tuple(sorted(row)) for row in indices}) > 95
    for row, row_mask in zip(indices, mask, strict=True):
        counts = _counts(CLUSTERS, row, row_mask)[PRESENT]
        assert counts.tolist() == [2, 2, 2, 2]


def test_bag_probabilities_aggregate_to_mean_median_max():
    scores = aggregate_bag_probabilities(np.array([0.1, 0.7, 0.4, 0.2]))
    assert isinstance(scores, BagScores)
    assert scores == pytest.approx((0.35, 0.3, 0.7))
    assert isinstance(scores.mean, float)
    with pytest.raises(ValueError, match="probabilities"):
        aggregate_bag_probabilities(np.array([]))


def test_collate_gathers_features_and_pads():
    rng = np.random.default_rng(0)
    slide_a = rng.normal(size=(10, 3, 4)).astype(np.float32)
    slide_b = rng.normal(size=(6, 3, 4)).astype(np.float32)
    items = [
        (slide_a, np.array([7, 2, 0]), np.array([True, True, False]), 1),
        (slide_b, np.array([5, 1, 3, 0]), np.array([True, True, True, True]), 0.0),
    ]
    batch = collate_bags(items)
    assert batch["features"].shape == (2, 4, 3, 4) and batch["features"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool and batch["label"].dtype == torch.float32
    assert batch["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["label"].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(batch["features"][0, :2].numpy(), slide_a[[7, 2]])
    np.testing.assert_array_equal(batch["features"][1].numpy(), slide_b[[5, 1, 3, 0]])
    assert (batch["features"][0, 2:] == 0).all()  # padding is zero


def test_sampled_bags_feed_the_model():
    rng = np.random.default_rng(0)
    clusters = rng.permutation(np.repeat([0, 1, 2, 3], [9, 7, 8, 6]))
    slides = [(rng.normal(size=(30, 3, 5)).astype(np.float32), clusters, 1)]
    slides.append((rng.normal(size=(3, 3, 5)).astype(np.float32), np.array([2, 2, 0]), 0))
    items = []
    for features, clusters, label in slides:
        indices, mask = sample_bag(clusters, 8, rng)
        items.append((features, indices, mask, label))
    batch = collate_bags(items)
    assert batch["mask"].sum(dim=1).tolist() == [8, 3]
    model = csmil(in_dim=5).eval()
    attention = model.attention(batch)["instance"]
    assert (attention[~batch["mask"]] == 0).all()
    assert model(batch).shape == (2,)


@pytest.mark.parametrize(
    ("clusters", "bag_size", "rng", "match"),
    [
        (np.array([0, -1]), 4, np.random.default_rng(0), "clusters"),
        (np.array([0.0, 1.0]), 4, np.random.default_rng(0), "clusters"),
        (np.array([], dtype=int), 4, np.random.default_rng(0), "clusters"),
        (np.array([0, 1]), 0, np.random.default_rng(0), "bag_size"),
        (np.array([0, 1]), 2.5, np.random.default_rng(0), "bag_size"),
        (np.array([0, 1]), 4, np.random.RandomState(0), "rng"),
    ],
)
def test_bad_arguments_are_refused(clusters, bag_size, rng, match):
    with pytest.raises(ValueError, match=match):
        sample_bag(clusters, bag_size, rng)
    with pytest.raises(ValueError, match="n_bags"):
        sample_bags(np.array([0, 1]), 4, 0, np.random.default_rng(0))
