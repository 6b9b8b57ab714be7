"""The one-run audit on real training: it has power without DP and respects the claim with DP.

One client trains on a small credit partition plus its included canaries (the same path as a
ClientApp round: client_data adds them, train_round trains), and the server-side auditor
scores the canaries on the initial and final adapters.
"""

from __future__ import annotations

from fed_dp_lora.canary_audit import CanaryAudit
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.local_round import train_round

# 222 training records (test_fraction 0.95) + ~100 included canaries; several local epochs so
# that a non-private model memorizes canaries with random labels.
AUDIT = ("data.test_fraction=0.95", "audit.enabled=true", "audit.canaries=200", "audit.guess_fraction=0.3",
         "train.batch_size=32", "train.lr=0.01", "train.epochs=4", "rounds=2")


def audited_run(cfg) -> dict:
    central = CentralEvaluator(cfg)
    initial = central.initial_state()
    audit = CanaryAudit(cfg, central, initial)
    state, ledger, metrics = initial, None, {}
    for _ in range(int(cfg.rounds)):
        result = train_round(cfg, {"partition-id": 0, "num-partitions": 1}, state, ledger)
        state, ledger, metrics = result.state, result.ledger, result.metrics
    return audit.result(state, metrics.get("epsilon"), metrics.get("delta", 0.0))


def test_without_dp_the_audit_finds_clear_leakage(make_cfg):
    result = audited_run(make_cfg(*AUDIT, "privacy=none"))
    assert result["guesses"] == 60 and result["canaries"] == 200
    # Measured: 56 of 60 guesses right, a lower bound of 1.77.
    assert result["correct"] > 48, result
    assert result["epsilon_lower"] > 1.0, result


def test_with_dp_the_lower_bound_stays_below_the_claimed_epsilon(make_cfg):
    result = audited_run(make_cfg(*AUDIT, "privacy.epsilon=2"))
    assert 1.9 < result["claimed_epsilon"] <= 2.0
    assert result["delta"] > 0
    assert result["epsilon_lower"] <= result["claimed_epsilon"], result
