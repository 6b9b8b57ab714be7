"""One-run empirical privacy audit: Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run" (NeurIPS 2023).

m canaries are each included in training independently with probability 1/2. After one run,
the auditor scores every canary, guesses "included" for the highest scores and "excluded"
for the lowest, and abstains on the rest. Under (epsilon, delta)-DP, the number of correct
guesses v out of r is (up to a delta term) stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)), so every epsilon under which the observed v is too unlikely
is rejected: the largest rejected epsilon is a lower bound on the true epsilon at the given
confidence. A correct DP-SGD implementation must never yield a lower bound above its claim.

`p_value` and `epsilon_lower_bound` follow the paper's reference code (its Algorithm for the
(eps, delta) case, Theorem 5.2); no published package provides them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v correct guesses out of r (m canaries) under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    # alpha = max over i in 1..v of P[v - i <= Binomial(r, q) < v] / i (the paper's loop, vectorized)
    tails = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(tails / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon rejected at `confidence` (0 when none is): bisection on p_value."""
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high * 2
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


def guesses(scores: np.ndarray, included: np.ndarray, r: int) -> tuple[int, int]:
    """(guesses made, correct guesses): "in" for the r/2 highest scores, "out" for the r/2 lowest.

    r is fixed before the run (from the config): choosing it after seeing the scores would
    void the confidence level.
    """
    if len(scores) != len(included):
        raise ValueError("one score per canary")
    half = r // 2
    order = np.argsort(scores, kind="stable")
    guessed_out, guessed_in = order[:half], order[len(order) - half :]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return 2 * half, correct
