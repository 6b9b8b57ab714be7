"""The one-run audit on real training: it has power without DP and respects the claim with DP."""

from __future__ import annotations

import pytest

from fed_dp_lora.config import compose_config, validate
from fed_dp_lora.experiments.audit_power import POWER_SETTINGS, audited_run

# The audit's power is a property of real training on the packaged model: slow tier.
pytestmark = pytest.mark.slow


def config(*extra: str):
    cfg = compose_config([*POWER_SETTINGS, *extra])
    validate(cfg)
    return cfg


def test_without_dp_the_audit_finds_clear_leakage():
    result = audited_run(config("privacy=none"))
    assert result["guesses"] == 60 and result["canaries"] == 200
    # Measured: 56 of 60 guesses right, a lower bound of 1.77.
    assert result["correct"] > 48, result
    assert result["epsilon_lower"] > 1.0, result


def test_with_dp_the_lower_bound_stays_below_the_claimed_epsilon():
    result = audited_run(config("privacy.epsilon=2"))
    assert 1.9 < result["claimed_epsilon"] <= 2.0
    assert result["delta"] > 0
    assert result["epsilon_lower"] <= result["claimed_epsilon"], result
