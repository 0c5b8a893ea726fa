"""DeLong's test: the O(n log n) midrank algorithm (Sun & Xu, 2014) against the O(n^2) pairs.

``mmdiag.stats.roc.delong_test`` computes DeLong's placements from midranks. The baseline is
the textbook form: the Mann-Whitney kernel psi(x_i, y_j) of every (positive, negative) pair,
vectorised with numpy and chunked over the positives so that no block holds more than
about ``--max-pair-mib`` of pairs. Both run on the same seeded binormal data (half positive,
correlated scores) in one process; the script prints n, the seconds of each and their ratio,
and fails if the two disagree beyond 1e-9 relative.

    python benchmarks/delong.py [--sizes 1000 10000 50000] [--repeats 3] [--max-pair-mib 512]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.stats import norm

from mmdiag.stats.roc import delong_test


def pairwise_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray, max_pair_mib: float):
    """DeLong's test from all m * n kernel values, chunked over the positives."""
    is_pos = y.astype(bool)
    m, n = int(is_pos.sum()), int((~is_pos).sum())
    rows = max(1, int(max_pair_mib * 2**20 / (8 * 3 * n)))  # psi + two boolean masks
    v10, v01 = np.empty((2, m)), np.zeros((2, n))
    for k, s in enumerate((a, b)):
        pos, neg = s[is_pos], s[~is_pos]
        for start in range(0, m, rows):
            block = pos[start : start + rows, None]
            psi = (block > neg).astype(np.float64)
            psi += 0.5 * (block == neg)
            v10[k, start : start + rows] = psi.sum(axis=1) / n
            v01[k] += psi.sum(axis=0)
        v01[k] /= m
    auc = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n  # DeLong et al. (1988): S10 / m + S01 / n
    z = (auc[0] - auc[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return auc, cov, z, 2 * norm.sf(abs(z))


def best_of(repeats: int, func, *args):
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (fast one)")
    parser.add_argument("--max-pair-mib", type=float, default=512.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"{'n':>8} {'pairs':>12} {'fast s':>10} {'O(n^2) s':>10} {'ratio':>9}  max rel diff")
    for n in args.sizes:
        y = np.zeros(n, dtype=int)
        y[: n // 2] = 1
        shared = rng.standard_normal(n)
        a = np.round(0.8 * y + shared + rng.standard_normal(n), 3)  # some ties
        b = np.round(0.6 * y + shared + rng.standard_normal(n), 3)
        fast_s, fast = best_of(args.repeats, delong_test, y, a, b)
        # the O(n^2) one runs once at the largest size: tens of seconds
        slow_s, (auc, cov, z, p) = best_of(
            1 if n > 10_000 else args.repeats, pairwise_delong, y, a, b, args.max_pair_mib
        )
        ours = np.array([fast.auc_a, fast.auc_b, fast.var_a, fast.var_b, fast.cov, fast.z])
        theirs = np.array([auc[0], auc[1], cov[0, 0], cov[1, 1], cov[0, 1], z])
        rel = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
        rel = max(rel, abs(fast.p_value - p) / p)
        pairs = (n // 2) * (n - n // 2)
        ratio = slow_s / fast_s
        print(f"{n:>8} {pairs:>12,} {fast_s:>10.4f} {slow_s:>10.3f} {ratio:>9.0f}  {rel:.1e}")
        if rel > 1e-9:
            raise SystemExit(f"fast and O(n^2) DeLong disagree at n={n}: max rel diff {rel:.3g}")


if __name__ == "__main__":
    main()
