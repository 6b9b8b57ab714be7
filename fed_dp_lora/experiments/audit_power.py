"""The audits' power on real training, small enough for a test.

Input canaries (`audited_run`): one client trains on a small credit partition plus its
included canaries through the same path as a ClientApp round (client_data adds them,
train_round trains, the ledger composes), and the server-side auditor scores the canaries on
the initial and final adapters.

Release audit (`release_audit_run`): a whole federation in one process (the real ServerApp
and ClientApps), client 0 audited with Dirac gradient canaries in its DP steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fed_dp_lora.audit.canary import CanaryAudit
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.client_round import RoundRequest, train_round

# 222 training records (test_fraction 0.95) + ~100 included canaries, two rounds of four local
# epochs: a non-private model memorizes canaries with random labels.
POWER_SETTINGS = (
    "+preset=tiny",
    "data.test_fraction=0.95",
    "audit.enabled=true",
    "audit.canaries=200",
    "audit.guess_fraction=0.3",
    "train.batch_size=32",
    "train.lr=0.01",
    "train.epochs=4",
    "rounds=2",
)


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


# Two clients of ~222 credit records, two rounds of three local epochs: each included canary is
# sampled about six times (with four, the few never sampled look excluded and cost "out"
# guesses). SGD: Adam rescales every coordinate by its own history, so without DP the real
# records move an unused coordinate about as far as a canary moves its own (the release-audit
# table in docs/results.md has the Adam row). delta 1e-5 keeps the theorem's 2 m delta term
# small, so a leak can show above the claim; privacy-off runs ignore it.
RELEASE_SETTINGS = (
    "+preset=tiny data.test_fraction=0.9 rounds=2 train.epochs=3 train.batch_size=32 "
    "train.optimizer=sgd train.lr=0.01 eval.interval=2 privacy.seeded_noise=true "
    "privacy.delta=1e-5 audit.release.enabled=true audit.release.client=0"
)
RELEASE_CLIENTS = 2


def release_audit_run(overrides: str, output_dir: Path) -> dict[str, Any]:
    """One in-process federation with the release audit on; returns privacy.audit.release."""
    from fed_dp_lora.experiments.inprocess import run_federation

    summary = run_federation(f"{RELEASE_SETTINGS} {overrides}", RELEASE_CLIENTS, output_dir)
    return summary["privacy"]["audit"]["release"]


@contextlib.contextmanager
def planted_leak() -> Iterator[None]:
    """A "DP" client that adds no noise while its ledger counts the calibrated sigma.

    The bug the release audit must catch: in this block every DP step skips the noise (the
    engine's noise multiplier is zero while it draws), everything else is unchanged.
    """
    from fed_dp_lora.privacy.engine import PrivateGradientEngine

    honest = PrivateGradientEngine.finalize

    def without_noise(self: PrivateGradientEngine, *args: Any, **kwargs: Any) -> bool:
        sigma, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            return honest(self, *args, **kwargs)
        finally:
            self.noise_multiplier = sigma

    PrivateGradientEngine.finalize = without_noise  # type: ignore[method-assign]
    try:
        yield
    finally:
        PrivateGradientEngine.finalize = honest  # type: ignore[method-assign]
