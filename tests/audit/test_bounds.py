"""The one-run audit's statistics (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_dp_lora.audit.bounds import epsilon_lower_bound, guesses, p_value


def test_all_guesses_correct_matches_the_closed_form():
    # delta = 0: P[Binomial(r, q) >= r] = q^r, so the bound solves q^r = 0.05 with
    # q = e^eps / (1 + e^eps), i.e. eps = log(q / (1 - q)) for q = 0.05^(1/r).
    for r in (10, 40, 100):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        assert epsilon_lower_bound(1000, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-6)


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(1000, 100, 50, 0.0) == 0.0
    assert epsilon_lower_bound(1000, 100, 20, 0.0) == 0.0


def test_bound_sits_where_the_p_value_crosses_the_level():
    m, r, v, delta = 1000, 200, 160, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta, 0.95)
    assert eps > 0
    assert p_value(m, r, v, eps, delta) < 0.05 <= p_value(m, r, v, eps + 1e-3, delta)


def test_more_correct_guesses_and_smaller_delta_give_larger_bounds():
    m, r = 1000, 200
    bounds = [epsilon_lower_bound(m, r, v, 0.0) for v in (120, 140, 160, 180, 200)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    # The delta term can only weaken the evidence.
    assert epsilon_lower_bound(m, r, 180, 1e-4) < epsilon_lower_bound(m, r, 180, 0.0)


def test_a_true_epsilon_is_exceeded_at_most_at_the_error_rate():
    # Guesses that are exactly epsilon-DP randomized response: each correct with probability
    # e^eps / (1 + e^eps). A valid 95% lower bound exceeds the true epsilon in <= 5% of runs.
    rng = np.random.default_rng(0)
    eps_true, r, trials = 1.0, 100, 400
    q = 1 / (1 + math.exp(-eps_true))
    correct = rng.binomial(r, q, size=trials)
    over = sum(epsilon_lower_bound(r, r, int(v), 0.0) > eps_true for v in correct)
    assert over / trials <= 0.08  # 5% plus sampling slack (sd ~1.1% at 400 trials)
    # ...and the bound is not vacuous: it is usually positive at this epsilon.
    assert np.mean([epsilon_lower_bound(r, r, int(v), 0.0) > 0 for v in correct[:50]]) > 0.5


def test_guesses_take_the_tails_of_the_scores():
    scores = np.array([0.9, -0.5, 0.1, 0.8, -0.7, 0.0])
    included = np.array([True, False, True, False, False, True])
    # r=4: "in" for the two highest (0.9 -> in, 0.8 -> out), "out" for the two lowest (both out).
    assert guesses(scores, included, 4) == (4, 3)
    assert guesses(scores, included, 5) == (4, 3)  # an odd r rounds down to equal halves


def test_invalid_counts_are_refused():
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


def _reference_p_value(m, r, v, eps, delta):
    """The paper's reference code (Appendix D), loop for loop."""
    from scipy import stats

    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total = total + stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


@pytest.mark.parametrize("v,eps,delta", [(30, 0.5, 1e-5), (38, 2.0, 1e-3), (40, 3.0, 0.0), (12, 0.1, 1e-2)])
def test_p_value_equals_the_papers_reference_loop(v, eps, delta):
    assert p_value(500, 40, v, eps, delta) == pytest.approx(_reference_p_value(500, 40, v, eps, delta), rel=1e-9)
