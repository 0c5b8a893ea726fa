"""Tests for discrete-time survival training (mmdiag.training.survival)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mmdiag.genes import ExpressionPreprocessor, read_expression, read_gmt, select_gene_set
from mmdiag.io import write_tsv
from mmdiag.stats import concordance_index
from mmdiag.synth import tables as synth_tables
from mmdiag.training.survival import (
    assign_bins,
    fit_time_bins,
    nll_survival_loss,
    risk_from_hazards,
    survival_from_hazards,
)


def logits_of(hazards) -> torch.Tensor:
    h = torch.tensor(hazards, dtype=torch.float64)
    return torch.log(h / (1 - h))


# -------------------------------------------------------------------------------------- loss

# Three patients, K = 3 bins:
#   P1 hazards (0.1, 0.2, 0.5), event in bin 1:  -(log S_0 + log h_1) = -(log 0.9 + log 0.2)
#   P2 hazards (0.3, 0.4, 0.5), censored in bin 2: -log S_2 = -log(0.7 * 0.6 * 0.5) = -log 0.21
#   P3 hazards (0.5, 0.5, 0.5), event in bin 0:  -(log S_-1 + log h_0) = -(log 1 + log 0.5)
HAZARDS = [[0.1, 0.2, 0.5], [0.3, 0.4, 0.5], [0.5, 0.5, 0.5]]
BINS = torch.tensor([1, 2, 0])
EVENTS = torch.tensor([1, 0, 1])
P1 = -(math.log(0.9) + math.log(0.2))  # 1.7147984280919266
P2 = -math.log(0.7 * 0.6 * 0.5)  # 1.5606477482646683
P3 = -(math.log(1.0) + math.log(0.5))  # 0.6931471805599453


def test_loss_matches_hand_computation():
    loss = nll_survival_loss(logits_of(HAZARDS), BINS, EVENTS)
    assert loss.item() == pytest.approx((P1 + P2 + P3) / 3, rel=1e-12)
    assert loss.item() == pytest.approx(1.3228644523055133, rel=1e-12)


def test_alpha_downweights_only_the_censored_term():
    # (1 - alpha) * (unc + cens) + alpha * unc: the uncensored terms keep weight 1, the
    # censored ones get 1 - alpha
    alpha = 0.4
    loss = nll_survival_loss(logits_of(HAZARDS), BINS, EVENTS, alpha=alpha)
    assert loss.item() == pytest.approx((P1 + (1 - alpha) * P2 + P3) / 3, rel=1e-12)
    assert loss.item() == pytest.approx(1.1147780858702243, rel=1e-12)
    plain = nll_survival_loss(logits_of(HAZARDS), BINS, EVENTS, alpha=0.0)
    assert plain.item() - loss.item() == pytest.approx(alpha * P2 / 3, rel=1e-10)
    all_events = torch.ones(3, dtype=torch.long)
    assert nll_survival_loss(logits_of(HAZARDS), BINS, all_events, alpha=0.7).item() == (
        pytest.approx(nll_survival_loss(logits_of(HAZARDS), BINS, all_events).item(), rel=1e-15)
    )


def porpoise_form(hazards, bins, censored, alpha, eps=1e-7):
    """The product form, written out: S by cumprod, clamped, then logs (as in PORPOISE)."""
    n = len(bins)
    s = torch.cumprod(1 - hazards, dim=1)
    s_padded = torch.cat([torch.ones(n, 1, dtype=hazards.dtype), s], dim=1)
    y, c = bins.view(n, 1), censored.view(n, 1).to(hazards.dtype)
    unc = -(1 - c) * (
        torch.log(s_padded.gather(1, y).clamp(min=eps))
        + torch.log(hazards.gather(1, y).clamp(min=eps))
    )
    cens = -c * torch.log(s_padded.gather(1, y + 1).clamp(min=eps))
    return ((1 - alpha) * (unc + cens) + alpha * unc).mean()


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_loss_equals_the_product_form_on_random_inputs(alpha):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen, dtype=torch.float64) * 2
    bins = torch.randint(0, 5, (64,), generator=gen)
    events = torch.randint(0, 2, (64,), generator=gen)
    expected = porpoise_form(torch.sigmoid(logits), bins, 1 - events, alpha)
    got = nll_survival_loss(logits, bins, events, alpha=alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_gradients_flow_with_the_expected_values():
    # P_a: event in bin 1: loss -log(1 - h0) - log h1 -> d/dz0 = h0, d/dz1 = -(1 - h1), d/dz2 = 0
    # P_b: censored in bin 1: -log(1 - h0) - log(1 - h1) -> d/dz0 = h0, d/dz1 = h1, d/dz2 = 0
    hazards = [[0.2, 0.3, 0.6], [0.4, 0.1, 0.9]]
    logits = logits_of(hazards).requires_grad_()
    nll_survival_loss(logits, torch.tensor([1, 1]), torch.tensor([1, 0])).backward()
    expected = torch.tensor([[0.2, -0.7, 0.0], [0.4, 0.1, 0.0]], dtype=torch.float64) / 2
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)


def test_saturated_logits_stay_finite_and_clamp_at_eps():
    logits = torch.tensor([[40.0, 40.0, 40.0], [-40.0, -40.0, -40.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([2, 1]), torch.tensor([0, 1]), eps=1e-7)
    # censored after three certain events: -log max(S_2, eps) = -log eps
    # event with h ~ 0: -log S_0 - log max(h_1, eps) = -log(1 - e^-40 ...) - log eps ~ -log eps
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("logits", "bins", "events", "kwargs", "pattern"),
    [
        (torch.zeros(3), [0, 1, 2], [1, 1, 1], {}, r"hazard_logits must be \(n, K\)"),
        (torch.zeros(3, 2), [0, 1], [1, 1], {}, r"must have shape \(3,\)"),
        (torch.zeros(2, 2), [0, 2], [1, 1], {}, r"integers in \[0, 2\)"),
        (torch.zeros(2, 2), [0.0, 1.0], [1, 1], {}, r"integers in \[0, 2\)"),
        (torch.zeros(2, 2), [0, 1], [1, 2], {}, "event must be 0/1"),
        (torch.zeros(2, 2), [0, 1], [1, 0], {"alpha": 1.5}, "0 <= alpha <= 1"),
    ],
)
def test_loss_rejects_bad_inputs(logits, bins, events, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        nll_survival_loss(logits, torch.tensor(bins), torch.tensor(events), **kwargs)


# --------------------------------------------------------------------------------- time bins


def planted_times(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    event_time, censor_time = rng.exponential(40.0, n), rng.uniform(5.0, 120.0, n)
    return np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)


def test_bins_are_quantiles_of_uncensored_training_times():
    times, events = planted_times(0, 200)
    edges = fit_time_bins(times, events, n_bins=4)
    event_times = times[events == 1]
    assert edges[0] == 0.0 and edges[-1] == np.inf and len(edges) == 5
    np.testing.assert_array_equal(edges[1:-1], np.quantile(event_times, [0.25, 0.5, 0.75]))
    # the same cut points pd.qcut (PORPOISE) finds
    _, qcut_edges = pd.qcut(event_times, q=4, retbins=True)
    np.testing.assert_allclose(edges[1:-1], qcut_edges[1:-1], rtol=1e-15)
    assert fit_time_bins(times, events, n_bins=1).tolist() == [0.0, np.inf]


def test_censored_and_test_times_do_not_move_the_bins():
    times, events = planted_times(1, 300)
    train, test = np.arange(200), np.arange(200, 300)
    edges = fit_time_bins(times[train], events[train])

    moved = times.copy()
    censored_train = train[events[train] == 0]
    moved[censored_train] = moved[censored_train] * 7.0 + 1000.0  # far beyond every event
    moved[test] = np.linspace(0.0, 5000.0, len(test))  # test patients anywhere
    np.testing.assert_array_equal(fit_time_bins(moved[train], events[train]), edges)
    # had the bins been fitted on all patients, the test times would have moved them
    assert not np.array_equal(fit_time_bins(moved, events), edges)
    test_bins = assign_bins(moved[test], edges)
    assert test_bins.min() == 0 and test_bins.max() == 3  # outside the training range: outer bins


def test_assign_bins_boundaries():
    edges = np.array([0.0, 2.0, 3.0, 4.0, np.inf])
    times = np.array([0.0, 1.999, 2.0, 2.5, 3.0, 3.999, 4.0, 1e9])
    # left-closed bins [e_k, e_k+1): a time equal to an edge goes to the later bin
    assert assign_bins(times, edges).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    porpoise = pd.cut(times, bins=edges, right=False, labels=False, include_lowest=True)
    assert assign_bins(times, edges).tolist() == porpoise.tolist()
    # outer bins are open: the outer edges do not limit what maps where
    assert assign_bins([0.5, 50.0], [1.0, 2.0, 3.0, 4.0, 5.0]).tolist() == [0, 3]
    assert assign_bins(times, edges).dtype == np.int64


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: fit_time_bins([1, 2, 3, 9], [1, 1, 1, 0]), "3 events are too few for 4"),
        (lambda: fit_time_bins([5, 5, 5, 5, 6], [1, 1, 1, 1, 1]), "too many tied event times"),
        (lambda: fit_time_bins([1, -2, 3, 4], [1, 1, 1, 1]), "finite and >= 0"),
        (lambda: fit_time_bins([1, np.nan, 3, 4], [1, 1, 1, 1]), "finite and >= 0"),
        (lambda: fit_time_bins([1, 2, 3, 4], [1, 2, 1, 1]), "events must be 4 values of 0/1"),
        (lambda: fit_time_bins([1, 2, 3, 4], [1, 1, 1]), "events must be 4 values of 0/1"),
        (lambda: fit_time_bins([1, 2], [1, 1], n_bins=0), "n_bins must be a positive integer"),
        (lambda: assign_bins([1.0], [0.0, 2.0, 2.0, np.inf]), "strictly increasing"),
    ],
)
def test_bin_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# -------------------------------------------------------------------------------------- risk


def test_risk_is_minus_the_sum_of_survival():
    hazards = [[0.1, 0.2, 0.5], [0.5, 0.5, 0.5]]
    # S = (0.9, 0.72, 0.36) and (0.5, 0.25, 0.125)
    expected = [-(0.9 + 0.72 + 0.36), -(0.5 + 0.25 + 0.125)]
    torch.testing.assert_close(
        risk_from_hazards(logits_of(hazards)), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        survival_from_hazards(logits_of(hazards))[0],
        torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64),
    )
    as_numpy = risk_from_hazards(logits_of(hazards).numpy())
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, expected, rtol=1e-12)


def test_risk_increases_with_every_hazard():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 4))
    base = risk_from_hazards(logits)
    for k in range(4):
        raised = logits.copy()
        raised[:, k] += rng.uniform(0.1, 2.0, 50)
        assert np.all(risk_from_hazards(raised) > base)
    assert np.all(np.diff(risk_from_hazards(np.linspace(-3, 3, 20)[:, None] * np.ones(4))) > 0)


def test_c_index_of_perfectly_ordered_risks_is_one():
    times = np.arange(1.0, 11.0)
    events = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    logits = torch.tensor((3.0 - 0.5 * times)[:, None].repeat(3, axis=1))  # earlier = riskier
    risk = risk_from_hazards(logits).numpy()
    assert float(concordance_index(times, events, risk)) == 1.0
    assert float(concordance_index(times, events, -risk)) == 0.0


# ----------------------------------------------------------------------- learning end to end


def planted_cohort(tmp_path, seed: int = 0, n: int = 600):
    """Synthetic genes and survival (mmdiag.synth.tables), read back as the pipeline would."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:04d}" for i in range(n)]
    diseases = list(rng.choice(list(synth_tables.BASELINE_HAZARD_PER_MONTH), n))
    gene_sets = synth_tables.draw_gene_sets(rng, 40, 8, 8)
    expression = synth_tables.make_expression(rng, ids, diseases, gene_sets, 40)
    risk = synth_tables.risk_score(expression, gene_sets["tumour"])
    clinical = synth_tables.make_clinical(rng, ids, diseases, ["-"] * n, risk)
    write_tsv(expression, tmp_path / "expression.tsv")
    (tmp_path / "sets.gmt").write_text(synth_tables.format_gmt(gene_sets))
    return clinical


def features(tmp_path, clinical) -> np.ndarray:
    """Tumour-program score (mean z-score of its genes) and disease one-hot."""
    table = read_expression(tmp_path / "expression.tsv")
    tumour = select_gene_set(table, read_gmt(tmp_path / "sets.gmt"), "tumour")
    score = ExpressionPreprocessor(zscore=True).fit_transform(tumour).mean(axis=1)
    diseases = clinical["disease"].to_numpy()
    onehot = [diseases == d for d in synth_tables.BASELINE_HAZARD_PER_MONTH]
    return np.column_stack([score.to_numpy(), *onehot]).astype(np.float32)


def train_c_index(x: np.ndarray, times: np.ndarray, events: np.ndarray, steps: int = 300):
    """Training C-index and final loss of a linear hazard model (full batch, Adam)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 600 x 4 problem: thread hand-offs cost more than they save
    try:
        return _train(x, times, events, steps)
    finally:
        torch.set_num_threads(threads)


def _train(x: np.ndarray, times: np.ndarray, events: np.ndarray, steps: int):
    bins = torch.from_numpy(assign_bins(times, fit_time_bins(times, events, n_bins=4)))
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 4)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs, event = torch.tensor(x), torch.tensor(events)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = nll_survival_loss(model(inputs), bins, event)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        risk = risk_from_hazards(model(inputs)).numpy()
    return float(concordance_index(times, events, risk)), loss.item()


def test_linear_model_learns_the_planted_risk(tmp_path):
    clinical = planted_cohort(tmp_path)
    x = features(tmp_path, clinical)
    times = clinical["survival_months"].to_numpy()
    events = clinical["event"].to_numpy()
    c_index, loss = train_c_index(x, times, events)
    shuffled = x[np.random.default_rng(1).permutation(len(x))]
    c_shuffled, loss_shuffled = train_c_index(shuffled, times, events)
    assert c_index > 0.7
    assert abs(c_shuffled - 0.5) < 0.06
    assert loss < loss_shuffled
