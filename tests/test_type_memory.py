"""CTMM of MHD-Net: type-wise EMA update, eqs. 7-8 reading, ConMB (eq. 9), eq. 11 maps."""

import inspect
import math

import pytest
import torch

from mmdiag.models.type_memory import (
    PAPER_CAPACITIES,
    PAPER_ITEM_DIM,
    TypeMemory,
    TypeMemoryBank,
    items_to_map,
    map_to_queries,
)


def tiny_bank(decay=0.5):
    """2 types, 3 slots, 2-d items with hand-chosen values."""
    bank = TypeMemoryBank(2, 3, 2, decay=decay, seed=0)
    bank.items.copy_(
        torch.tensor(
            [
                [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
                [[0.0, -1.0], [1.0, 1.0], [-1.0, -1.0]],
            ]
        )
    )
    return bank


def same_banks(a, b):
    """Whether two TypeMemory objects hold identical banks."""
    return all(torch.equal(x.items, y.items) for x, y in zip(a.stages, b.stages, strict=True))


def reference_reconstruct(items, query, temperature=1.0):
    """Eqs. 7-8 written out item by item."""
    k_types, m_items, _ = items.shape
    scores = {}
    for k in range(k_types):
        for i in range(m_items):
            cos = torch.dot(items[k, i], query) / (items[k, i].norm() * query.norm())
            scores[k, i] = math.exp(float(cos) / temperature)
    total = sum(scores.values())
    return sum(scores[k, i] / total * items[k, i] for (k, i) in scores)


# --------------------------------------------------------------------------- eqs. 5-6


def test_update_matches_hand_computed_ema():
    bank = tiny_bank()
    before = bank.items.clone()
    queries = torch.tensor(
        [
            [[2.0, 0.5], [3.0, -0.5], [0.5, 4.0]],  # type 0: slots 0, 0, 1
            [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],  # type 1 but not tumour: ignored
        ]
    )
    bank.update(queries, labels=torch.tensor([0, 1]), tumour=torch.tensor([True, False]))
    # slot 0: 0.5 * (1, 0) + 0.5 * mean((2, .5), (3, -.5)) = (1.75, 0)
    # slot 1: 0.5 * (0, 1) + 0.5 * (0.5, 4) = (0.25, 2.5); slot 2 receives nothing
    expected_type0 = torch.tensor([[1.75, 0.0], [0.25, 2.5], [-1.0, 0.0]])
    assert torch.equal(bank.items[0], expected_type0)
    assert torch.equal(bank.items[1], before[1])


def test_update_applies_samples_in_batch_order():
    bank = tiny_bank()
    queries = torch.tensor([[[0.5, 4.0]], [[0.0, 2.0]]])
    bank.update(queries, labels=torch.tensor([0, 0]), tumour=torch.tensor([True, True]))
    # first (0, 1) -> (0.25, 2.5), then -> 0.5 * (0.25, 2.5) + 0.5 * (0, 2)
    assert torch.equal(bank.items[0, 1], torch.tensor([0.125, 2.25]))
    assert torch.equal(bank.items[0, 0], torch.tensor([1.0, 0.0]))


def test_update_touches_only_the_label_bank():
    bank = tiny_bank(decay=0.9)
    before = bank.items.clone()
    bank.update(torch.randn(1, 5, 2), labels=torch.tensor([1]), tumour=torch.tensor([True]))
    assert torch.equal(bank.items[0], before[0])
    assert not torch.equal(bank.items[1], before[1])


def test_update_refuses_in_eval_mode_and_bad_labels():
    bank = tiny_bank().eval()
    with pytest.raises(RuntimeError, match="training mode"):
        bank.update(torch.randn(1, 2, 2), torch.tensor([0]), torch.tensor([True]))
    bank.train()
    with pytest.raises(ValueError, match="labels"):
        bank.update(torch.randn(1, 2, 2), torch.tensor([2]), torch.tensor([True]))


def test_banks_are_buffers_with_deterministic_initialisation():
    bank = TypeMemoryBank(3, 4, 5, decay=0.9, seed=7)
    assert list(bank.parameters()) == []
    assert torch.equal(bank.items, TypeMemoryBank(3, 4, 5, decay=0.9, seed=7).items)
    assert not torch.equal(bank.items, TypeMemoryBank(3, 4, 5, decay=0.9, seed=8).items)


# --------------------------------------------------------------------------- eqs. 7-8


def test_reconstruct_matches_reference():
    bank = TypeMemoryBank(3, 4, 5, decay=0.9, seed=1).double()
    queries = torch.randn(2, 6, 5, dtype=torch.float64)
    for temperature in (1.0, 0.3):
        rec = bank.reconstruct(queries, temperature=temperature)
        for b in range(2):
            for j in range(6):
                expected = reference_reconstruct(bank.items, queries[b, j], temperature)
                torch.testing.assert_close(rec[b, j], expected)


def test_temperature_limits():
    bank = TypeMemoryBank(2, 3, 4, decay=0.9, seed=2).double()
    query = torch.randn(1, 4, dtype=torch.float64)
    items = bank.items.reshape(-1, 4)
    nearest = items[torch.nn.functional.cosine_similarity(items, query).argmax()]
    torch.testing.assert_close(bank.reconstruct(query, temperature=1e-4)[0], nearest)
    torch.testing.assert_close(bank.reconstruct(query, temperature=1e12)[0], items.mean(0))


# --------------------------------------------------------------------------- eq. 11


def test_type_weighted_items_matches_reference():
    bank = TypeMemoryBank(3, 4, 5, decay=0.9, seed=3)
    weights = torch.softmax(torch.randn(2, 3), dim=1)
    out = bank.type_weighted_items(weights)
    for b in range(2):
        expected = sum(weights[b, k] * bank.items[k] for k in range(3))
        torch.testing.assert_close(out[b], expected)


def test_map_layout_and_nearest_upsampling():
    c, t = 2, 3
    items = torch.arange(4 * c * t, dtype=torch.float32).reshape(1, 4, c * t)
    out = items_to_map(items, c, t, 4, 4)  # 2x2 grid over 4x4
    for y in range(4):
        for x in range(4):
            for ci in range(c):
                for ti in range(t):
                    item = (y // 2) * 2 + x // 2
                    assert out[0, ci, ti, y, x] == items[0, item, ci * t + ti]
    with pytest.raises(ValueError, match="multiples"):
        items_to_map(items, c, t, 3, 3)


def test_map_to_queries_round_trip():
    feature_map = torch.randn(2, 3, 4, 5, 5)
    queries = map_to_queries(feature_map)
    assert queries.shape == (2, 25, 12)
    torch.testing.assert_close(queries[1, 2 * 5 + 3], feature_map[1, :, :, 2, 3].flatten())
    assert torch.equal(items_to_map(queries, 3, 4, 5, 5), feature_map)


# --------------------------------------------------------------------------- ConMB (eq. 9)


def constant_memory():
    """3 stages whose every item is v_s, so f_rec^{ss'} = v_s' exactly."""
    memory = TypeMemory(2, (1, 1, 1), num_types=2).double()
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    for bank, v in zip(memory.stages, values, strict=True):
        bank.items.copy_(v.expand_as(bank.items))
    return memory, values


def test_conmb_matches_hand_computed_value():
    memory, v = constant_memory()
    f = torch.tensor([[1.0, 1.0], [0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    maps = [f[s].reshape(1, 2, 1, 1, 1) for s in range(3)]
    d = [[math.dist(v[sp].tolist(), f[s].tolist()) for sp in range(3)] for s in range(3)]
    ratios = [d[s][s] / (sum(d[s]) - d[s][s]) for s in range(3)]
    cos = [float(torch.dot(v[s], f[s]) / (v[s].norm() * f[s].norm())) for s in range(3)]
    eta = [math.exp(1 - c) for c in cos]
    expected = sum(e / sum(eta) * r for e, r in zip(eta, ratios, strict=True))
    assert memory.conmb_loss(maps).item() == pytest.approx(expected, rel=1e-12)
    # sample 1 as computed, sample 2 far from every item: the mask keeps sample 1 only
    both = [torch.cat([m, 5 * m + 1]) for m in maps]
    assert memory.conmb_loss(both, sample_mask=torch.tensor([True, False])).item() == (
        pytest.approx(expected, rel=1e-12)
    )
    assert memory.conmb_loss(both).item() != pytest.approx(expected, rel=1e-6)


def test_conmb_gradient_reaches_queries_not_banks():
    memory = TypeMemory(6, (4, 1), num_types=2, seed=4).double()
    maps = [
        torch.randn(2, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, 2, 1, 1, dtype=torch.float64, requires_grad=True),
    ]
    memory.conmb_loss(maps).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)
    assert all(not bank.items.requires_grad and bank.items.grad is None for bank in memory.stages)


def test_forward_updates_before_conmb():
    maps = [torch.randn(2, 2, 3, 2, 2), torch.randn(2, 3, 2, 1, 1)]
    labels, tumour = torch.tensor([0, 1]), torch.tensor([True, True])
    memory = TypeMemory(6, (4, 1), num_types=2, decay=0.5, seed=5)
    reference = TypeMemory(6, (4, 1), num_types=2, decay=0.5, seed=5)
    reference.update(maps, labels, tumour)
    loss = memory(maps, labels, tumour)
    assert torch.equal(loss, reference.conmb_loss(maps))
    assert same_banks(memory, reference)


# --------------------------------------------------------------------------- evaluation


def test_eval_reading_changes_no_buffer_and_takes_no_labels():
    memory = TypeMemory(6, (4, 1), num_types=2, seed=6)
    memory.update(
        [torch.randn(3, 2, 3, 2, 2), torch.randn(3, 3, 2, 1, 1)],
        torch.tensor([0, 1, 1]),
        torch.tensor([True, True, False]),
    )
    memory.eval()
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    weights = torch.softmax(torch.randn(3, 2), dim=1)
    shapes = [(2, 3, 4, 4), (3, 2, 1, 1)]
    first = memory.read_maps(weights, shapes)
    assert "labels" not in inspect.signature(memory.read_maps).parameters
    with pytest.raises(RuntimeError, match="training mode"):
        memory(
            [torch.randn(3, 2, 3, 2, 2), torch.randn(3, 3, 2, 1, 1)],
            torch.tensor([1, 0, 0]),
            torch.tensor([True, True, True]),
        )
    second = memory.read_maps(weights, shapes)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    after = memory.state_dict()
    assert all(before[k].numpy().tobytes() == after[k].numpy().tobytes() for k in before)


def test_state_dict_round_trip_restores_banks():
    memory = TypeMemory(6, (4, 1), num_types=2, seed=7)
    memory.update(
        [torch.randn(1, 2, 3, 2, 2), torch.randn(1, 3, 2, 1, 1)],
        torch.tensor([1]),
        torch.tensor([True]),
    )
    restored = TypeMemory(6, (4, 1), num_types=2, seed=8)
    restored.load_state_dict(memory.state_dict())
    assert set(memory.state_dict()) == {"stages.0.items", "stages.1.items"}
    assert same_banks(memory, restored)


# --------------------------------------------------------------------------- paper scale


def test_paper_scale_shapes():
    memory = TypeMemory(PAPER_ITEM_DIM, PAPER_CAPACITIES)
    assert [bank.items.shape for bank in memory.stages] == [
        (8, 784, 768),
        (8, 784, 768),
        (8, 196, 768),
    ]
    stage1 = torch.randn(1, 64, 12, 56, 56)
    memory.stages[0].update(map_to_queries(stage1), torch.tensor([3]), torch.tensor([True]))
    rec = memory.stages[0].reconstruct(map_to_queries(stage1))
    assert rec.shape == (1, 56 * 56, 768)
    shapes = [(64, 12, 56, 56), (128, 6, 28, 28), (256, 3, 14, 14)]
    maps = memory.eval().read_maps(torch.softmax(torch.randn(2, 8), dim=1), shapes)
    assert [tuple(m.shape) for m in maps] == [(2, *s) for s in shapes]
    # stage 1: each of the 28x28 items fills a 2x2 block of the 56x56 map
    assert torch.equal(maps[0][..., ::2, ::2], maps[0][..., 1::2, 1::2])
