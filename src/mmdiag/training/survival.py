"""Discrete-time survival: time bins, the negative log-likelihood loss and a risk score.

The form of Zadeh & Schmid (2020) used by PORPOISE and MCAT (Chen et al.): follow-up time is
cut into ``K`` bins, a model predicts one hazard logit per bin, and the hazard of bin ``k`` is
``h_k = sigmoid(logit_k)``, the probability that the event happens in bin ``k`` given that the
patient survived bins ``0..k-1``. The survival function after bin ``k`` is
``S_k = prod_{j<=k} (1 - h_j)`` (``S_{-1} = 1``).

Time bins (:func:`fit_time_bins`) are the quantiles of the *uncensored* training times, as in
PORPOISE (which cuts them with ``pd.qcut`` and widens the outer edges to the minimum and
maximum time minus/plus 1e-6). Here the outer bins are open instead, so that a validation or
test time outside the training range still maps to the first or last bin; and the bins are
fitted on the training split only, never on the patients they are evaluated on.

References
----------
.. [1] S. G. Zadeh and M. Schmid, "Bias in cross-entropy-based training of deep survival
   networks", IEEE TPAMI 43(9):3126-3137, 2021 (online 2020).
.. [2] R. J. Chen et al., "Pan-cancer integrative histology-genomic analysis via multimodal
   deep learning" (PORPOISE), Cancer Cell 40(8):865-878, 2022.
.. [3] R. J. Chen et al., "Multimodal co-attention transformer for survival prediction in
   gigapixel whole slide images" (MCAT), ICCV 2021.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "assign_bins",
    "fit_time_bins",
    "nll_survival_loss",
    "risk_from_hazards",
    "survival_from_hazards",
]


# ------------------------------------------------------------------------------- time bins


def _as_times(times, name: str = "times") -> np.ndarray:
    values = np.asarray(times, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    return values


def _as_events(events, n: int) -> np.ndarray:
    values = np.asarray(events)
    if values.shape != (n,) or not np.all(np.isin(values, (0, 1))):
        raise ValueError(f"events must be {n} values of 0/1 (or bool), one per time")
    return values.astype(bool)


def fit_time_bins(times, events, n_bins: int = 4) -> np.ndarray:
    """Bin edges from the quantiles of the uncensored (event) times of the training patients.

    Parameters
    ----------
    times : array-like of float, shape (n,)
        Training follow-up times, finite and >= 0.
    events : array-like of 0/1 or bool, shape (n,)
        1 where the event was observed at ``times``, 0 where the patient was censored.
        Censored times do not move the edges.
    n_bins : int
        Number of bins ``K`` (4: the quartiles, as in PORPOISE and MCAT).

    Returns
    -------
    numpy.ndarray, shape (n_bins + 1,)
        ``[0, q_1, ..., q_{K-1}, inf]`` where ``q_k = numpy.quantile(event_times, k / K)``
        (numpy's default linear interpolation, the same quantiles ``pd.qcut`` cuts at). The
        interior edges define the bins; the outer ones only record that the first bin starts
        at time 0 and the last one is open, see :func:`assign_bins`.

    Raises
    ------
    ValueError
        Fewer than ``n_bins`` events, or tied quantiles (empty bins; too many equal event
        times for ``n_bins``).

    Examples
    --------
    >>> fit_time_bins([1, 2, 3, 4, 5, 100], [1, 1, 1, 1, 1, 0], n_bins=4).tolist()
    [0.0, 2.0, 3.0, 4.0, inf]
    """
    times = _as_times(times)
    events = _as_events(events, len(times))
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    event_times = times[events]
    if len(event_times) < n_bins:
        raise ValueError(f"{len(event_times)} events are too few for {n_bins} time bins")
    interior = np.quantile(event_times, np.arange(1, n_bins) / n_bins)
    edges = np.concatenate([[0.0], interior, [np.inf]])
    if np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"time bin edges {edges.tolist()} are not increasing: too many tied event times "
            f"for {n_bins} bins"
        )
    return edges


def assign_bins(times, edges) -> np.ndarray:
    """Bin index in ``[0, K)`` of each time, for edges from :func:`fit_time_bins`.

    Bins are closed on the left and open on the right, ``[e_k, e_{k+1})`` as PORPOISE's
    ``pd.cut(..., right=False)``: a time equal to an interior edge ``e_k`` goes to bin ``k``,
    the later one. The outer bins are open: a time below ``e_1`` is in bin 0 and a time at or
    beyond ``e_{K-1}`` in bin ``K - 1``, whatever the outer edges are.

    Examples
    --------
    >>> assign_bins([0.0, 1.9, 2.0, 3.5, 4.0, 500.0], [0.0, 2.0, 3.0, 4.0, np.inf]).tolist()
    [0, 0, 1, 2, 3, 3]
    """
    times = _as_times(times)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be 1-D, at least 2 values, strictly increasing")
    return np.searchsorted(edges[1:-1], times, side="right").astype(np.int64)


# ------------------------------------------------------------------------------------ loss


def _check_loss_inputs(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"hazard_logits must be (n, K), got shape {tuple(logits.shape)}")
    n, n_bins = logits.shape
    if bins.shape != (n,) or event.shape != (n,):
        raise ValueError(f"bin_index and event must have shape ({n},)")
    if bins.dtype.is_floating_point or bool(((bins < 0) | (bins >= n_bins)).any()):
        raise ValueError(f"bin_index must be integers in [0, {n_bins})")
    if not bool(((event == 0) | (event == 1)).all()):
        raise ValueError("event must be 0/1 (or bool)")


def nll_survival_loss(
    hazard_logits: torch.Tensor,
    bin_index: torch.Tensor,
    event: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (Zadeh & Schmid), batch mean.

    Parameters
    ----------
    hazard_logits : torch.Tensor, shape (n, K)
        One logit per time bin; ``h = sigmoid(hazard_logits)``.
    bin_index : torch.Tensor of int, shape (n,)
        Each patient's time bin ``y`` (:func:`assign_bins`).
    event : torch.Tensor of 0/1 or bool, shape (n,)
        1 if the event was observed in bin ``y``, 0 if censored in it; ``c = 1 - event``.
    alpha : float
        Weight in [0, 1] moved from the full likelihood to its uncensored part: 0 is the plain
        likelihood (the ``--alpha_surv`` default of the PORPOISE and MCAT training scripts,
        whose ``nll_loss`` function itself defaults to 0.4).
    eps : float
        Floor of ``S`` and ``h`` inside the logarithms, as in PORPOISE.

    Returns
    -------
    torch.Tensor
        Scalar: the mean over patients of

        ``(1 - alpha) * (L_unc + L_cens) + alpha * L_unc`` with
        ``L_unc = -(1 - c) * [log S_{y-1} + log h_y]`` and ``L_cens = -c * log S_y``.

    Notes
    -----
    Computed in log space: ``log h = logsigmoid(z)``, ``log(1 - h) = logsigmoid(-z)`` and
    ``log S_k = sum_{j<=k} log(1 - h_j)``, each clamped below at ``log(eps)``. That equals the
    clamped products ``log(max(S, eps))`` of PORPOISE (the logarithm is monotone) but keeps
    finite values and gradients where ``1 - h`` rounds to 0 in float32.
    """
    bins = torch.as_tensor(bin_index, device=hazard_logits.device)
    event = torch.as_tensor(event, device=hazard_logits.device)
    _check_loss_inputs(hazard_logits, bins, event)
    if not 0.0 <= alpha <= 1.0 or not 0.0 < eps < 1.0:
        raise ValueError(f"need 0 <= alpha <= 1 and 0 < eps < 1, got alpha={alpha}, eps={eps}")
    floor = math.log(eps)
    y = bins.long().unsqueeze(1)  # (n, 1)
    c = 1.0 - event.to(hazard_logits.dtype).unsqueeze(1)  # censoring indicator, (n, 1)
    log_h = F.logsigmoid(hazard_logits)  # log h_k
    log_s = torch.cumsum(F.logsigmoid(-hazard_logits), dim=1)  # log S_k = sum_{j<=k} log(1-h_j)
    log_s_padded = F.pad(log_s, (1, 0))  # column k holds log S_{k-1}; column 0 is log S_{-1}=0
    log_s_before = log_s_padded.gather(1, y).clamp_min(floor)  # log S_{y-1}
    log_h_at = log_h.gather(1, y).clamp_min(floor)  # log h_y
    log_s_at = log_s_padded.gather(1, y + 1).clamp_min(floor)  # log S_y
    uncensored = -(1.0 - c) * (log_s_before + log_h_at)  # event in bin y: survived to y, died
    censored = -c * log_s_at  # censored in bin y: survived through bin y
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
    return loss.mean()


# ------------------------------------------------------------------------------------ risk


def survival_from_hazards(hazard_logits: torch.Tensor) -> torch.Tensor:
    """``S_k = prod_{j<=k} (1 - sigmoid(logit_j))`` for each patient, shape (n, K)."""
    return torch.exp(torch.cumsum(F.logsigmoid(-hazard_logits), dim=1))


def risk_from_hazards(hazard_logits):
    """Risk score ``-sum_k S_k`` (higher means an earlier expected event), as in PORPOISE.

    ``sum_k S_k`` is the expected number of the ``K`` bins a patient survives, so its negative
    orders patients like a hazard; use it with :func:`mmdiag.stats.concordance_index`. A
    torch tensor gives a tensor (gradients flow); anything else gives a numpy array.

    Examples
    --------
    >>> risk_from_hazards(np.array([[0.0, 0.0], [2.0, 2.0]])).round(4).tolist()
    [-0.75, -0.1334]
    """
    if isinstance(hazard_logits, torch.Tensor):
        return -survival_from_hazards(hazard_logits).sum(dim=1)
    logits = torch.as_tensor(np.asarray(hazard_logits, dtype=np.float64))
    return (-survival_from_hazards(logits).sum(dim=1)).numpy()
