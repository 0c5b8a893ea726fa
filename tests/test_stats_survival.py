"""Harrell's C against R survival 3.5 ``concordance(..., reverse = TRUE)`` and a pair loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmdiag.stats.survival import ConcordanceResult, concordance_index

FIXTURES = Path(__file__).parent / "fixtures" / "stats" / "paired"
INPUTS = pd.read_csv(FIXTURES / "survival_inputs.tsv.gz", sep="\t", dtype=str)
EXPECTED = pd.read_csv(FIXTURES / "survival_expected.tsv", sep="\t", dtype=str).set_index("case")


def case_inputs(case: str):
    rows = INPUTS[INPUTS["case"] == case]
    time = np.array([float(v) for v in rows["time"]])  # Python's float is correctly rounded
    risk = np.array([float(v) for v in rows["risk"]])
    return time, rows["event"].astype(int).to_numpy(), risk


def concordance_by_pair_loop(time, event, risk) -> tuple[int, int, int]:
    """Obviously-correct O(n^2) reference: (concordant, discordant, tied risk)."""
    concordant = discordant = tied = 0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            outlives = time[j] > time[i] or (time[j] == time[i] and not event[j])
            if j == i or not outlives:
                continue
            if risk[i] > risk[j]:
                concordant += 1
            elif risk[i] < risk[j]:
                discordant += 1
            else:
                tied += 1
    return concordant, discordant, tied


@pytest.mark.parametrize("case", EXPECTED.index)
def test_matches_r_concordance(case):
    expected = EXPECTED.loc[case]
    result = concordance_index(*case_inputs(case))
    c_index = float(expected["c_index"])
    assert abs(result.c_index - c_index) <= 1e-9 * abs(c_index), (result.c_index, c_index)
    assert result.concordant == int(float(expected["concordant"]))
    assert result.discordant == int(float(expected["discordant"]))
    assert result.tied_risk == int(float(expected["tied_x"]))
    assert result.comparable == result.concordant + result.discordant + result.tied_risk


def test_matches_pair_loop_on_random_inputs():
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(2, 80))
        time = rng.integers(1, 12, n).astype(float)
        event = rng.random(n) < 0.6
        risk = np.round(rng.normal(size=n), 1)
        if not event.any():
            continue
        counts = concordance_by_pair_loop(time, event, risk)
        result = concordance_index(time, event, risk)
        assert (result.concordant, result.discordant, result.tied_risk) == counts
        if sum(counts):
            assert float(result) == pytest.approx((counts[0] + counts[2] / 2) / sum(counts))


def test_higher_risk_earlier_event_is_one():
    result = concordance_index([1.0, 2.0, 3.0], [1, 1, 1], [3.0, 2.0, 1.0])
    assert result == ConcordanceResult(1.0, 3, 0, 0, 3)
    assert float(result) == 1.0 and isinstance(result.c_index, float)


def test_tied_times_with_events_are_not_comparable_but_censored_tie_is():
    with pytest.warns(RuntimeWarning, match="no comparable pairs"):
        both_events = concordance_index([2.0, 2.0], [1, 1], [1.0, 0.0])
    assert math.isnan(both_events.c_index)
    event_censored = concordance_index([2.0, 2.0], [1, 0], [1.0, 0.0])
    assert event_censored.comparable == 1 and event_censored.c_index == 1.0


def test_all_censored_warns_nan():
    with pytest.warns(RuntimeWarning, match="no comparable pairs"):
        result = concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [1.0, 2.0, 3.0])
    assert math.isnan(float(result)) and result.comparable == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0, 2.0], [1, 0, 1], [0.1, 0.2]), "lengths differ"),
        (([1.0], [1], [0.1]), "at least 2"),
        (([1.0, np.nan], [1, 0], [0.1, 0.2]), r"time must be finite, got nan at index 1"),
        (([1.0, 2.0], [1, 2], [0.1, 0.2]), r"event must be boolean or 0/1, got 2 at index 1"),
        (([1.0, 2.0], [1, 0], [0.1, np.inf]), "risk must be finite"),
        ((["a", "b"], [1, 0], [0.1, 0.2]), "time must be numeric"),
    ],
)
def test_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        concordance_index(*args)


def test_fast_enough_for_large_cohorts():
    rng = np.random.default_rng(4)
    n = 50_000
    result = concordance_index(rng.exponential(size=n), rng.random(n) < 0.5, rng.normal(size=n))
    assert 0.45 < float(result) < 0.55
