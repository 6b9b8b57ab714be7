"""The audit's power on real training, small enough for a test: one client, many canaries.

One client trains on a small credit partition plus its included canaries through the same
path as a ClientApp round (client_data adds them, train_round trains, the ledger composes),
and the server-side auditor scores the canaries on the initial and final adapters.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fed_dp_lora.canary_audit import CanaryAudit
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.client_round import RoundRequest, train_round

# 222 training records (test_fraction 0.95) + ~100 included canaries, two rounds of four local
# epochs: a non-private model memorizes canaries with random labels.
POWER_SETTINGS = ("+preset=tiny", "data.test_fraction=0.95", "audit.enabled=true", "audit.canaries=200",
                  "audit.guess_fraction=0.3", "train.batch_size=32", "train.lr=0.01", "train.epochs=4",
                  "rounds=2")


def audited_run(cfg: DictConfig) -> dict[str, Any]:
    """Train one client for cfg.rounds rounds and return the audit record."""
    central = CentralEvaluator(cfg)
    initial = central.initial_state()
    audit = CanaryAudit(cfg, central, initial)
    state, ledger, metrics = initial, None, {}
    for _ in range(int(cfg.rounds)):
        result = train_round(cfg, {"partition-id": 0, "num-partitions": 1}, RoundRequest(state), ledger)
        state, ledger, metrics = result.state, result.ledger, result.metrics
    return audit.result(state, metrics.get("epsilon"), metrics.get("delta", 0.0))
