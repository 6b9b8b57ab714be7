"""The audit of one client's per-round releases: its canaries (client side) and the auditor.

The client whose partition id is `audit.release.client` adds the included Dirac canaries to
every DP step (`release_canaries`, passed to the gradient engine as `extra`). The server
(`ReleaseAudit.observe`, called by CheckedAggregation.screen for every accepted update, int8
uploads already decoded) scores canary j after each round by

    s_j * (global adapter - release)[c_j], summed over the rounds so far:

how far the client's DP-SGD moved the canary's coordinate in the canary's direction of descent.
That uses only what the server saw, never the coins. It guesses "in" for the `guesses`/2
highest scores, "out" for the lowest, and bounds epsilon with audit/bounds.py against the
client's claimed (epsilon, delta) from its reply (its ledger). Each round's bound holds at the
confidence on its own; the last one, over every release, is the audit's result.

Tried and left out: subtracting the other clients' mean update at each canary's coordinate
(a post-processing too) barely helped: the real records' drift at a coordinate comes mostly
from the client's own batches, not from what all clients share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig
from torch import nn

from fed_dp_lora.audit.bounds import epsilon_lower_bound, guesses
from fed_dp_lora.audit.dirac import DiracCanaries, StepCanaries, canary_generator
from fed_dp_lora.config import ConfigError
from fed_dp_lora.reply import DELTA, EPSILON, PARTITION_ID
from fed_dp_lora.wire import scalar

METHOD = (
    "Steinke, Nasr, Jagielski 2023, one training run, white-box: Dirac gradient canaries "
    "Poisson-sampled into one client's DP steps"
)
SCORE = "canary-direction descent of its coordinate, (global - release) * sign, summed over rounds"


def release_canaries(
    cfg: DictConfig, partition: tuple[int, int] | None, model: nn.Module, rate: float, sampling: torch.Generator | None
) -> StepCanaries | None:
    """The engine's `extra` for the audited client; None for every other client."""
    audit = cfg.audit.release
    if not audit.enabled or partition is None or partition[0] != int(audit.client):
        return None
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    canaries = DiracCanaries.draw(sizes, int(audit.canaries), int(cfg.audit.seed))
    return StepCanaries(canaries, model, rate, float(cfg.privacy.clip_norm), canary_generator(sampling))


class ReleaseAudit:
    """The auditor: accumulates canary scores from the audited client's releases."""

    def __init__(self, cfg: DictConfig, adapter: Mapping[str, torch.Tensor]) -> None:
        audit = cfg.audit.release
        self.client = int(audit.client)
        self.guesses = int(audit.guesses)
        self.confidence = float(cfg.audit.confidence)
        sizes = {n: t.numel() for n, t in adapter.items()}
        if int(audit.canaries) > sum(sizes.values()):
            raise ConfigError(
                f"audit.release.canaries: {audit.canaries} canaries need as many coordinates, the "
                f"adapter has {sum(sizes.values())}. Fix: use fewer canaries"
            )
        self.canaries = DiracCanaries.draw(sizes, int(audit.canaries), int(cfg.audit.seed))
        self.scores = np.zeros(len(self.canaries))
        self.rounds: list[dict[str, Any]] = []

    def observe(self, server_round: int, metrics: MetricRecord, release: ArrayRecord, reference: ArrayRecord) -> None:
        """Score one accepted update (as decoded by the strategy); others' updates are ignored."""
        if PARTITION_ID not in metrics or int(scalar(metrics[PARTITION_ID])) != self.client:
            return
        before, after = self._read(reference), self._read(release)
        self.scores += self.canaries.sign * (before - after)
        claimed = scalar(metrics[EPSILON]) if EPSILON in metrics else None
        delta = scalar(metrics[DELTA]) if DELTA in metrics else 0.0
        made, correct = guesses(self.scores, self.canaries.included, self.guesses)
        self.rounds.append(
            {
                "round": server_round,
                "claimed_epsilon": claimed,
                "delta": delta,
                "guesses": made,
                "correct": correct,
                "epsilon_lower": self._bound(made, correct, delta),
            }
        )

    def _read(self, arrays: ArrayRecord) -> np.ndarray:
        return self.canaries.read({name: arrays[name].numpy() for name in self.canaries.names})

    def _bound(self, made: int, correct: int, delta: float) -> float:
        return epsilon_lower_bound(len(self.canaries), made, correct, delta, self.confidence)

    def result(self) -> dict[str, Any]:
        """The record for summary.json's privacy.audit.release (final = the last round seen)."""
        last: dict[str, Any] = (
            self.rounds[-1]
            if self.rounds
            else {"claimed_epsilon": None, "delta": 0.0, "guesses": 0, "correct": 0, "epsilon_lower": 0.0}
        )
        return {
            "client": f"client-{self.client}",
            "epsilon_lower": last["epsilon_lower"],
            "claimed_epsilon": last["claimed_epsilon"],
            "delta": last["delta"],
            "canaries": len(self.canaries),
            "included": int(self.canaries.included.sum()),
            "guesses": last["guesses"],
            "correct": last["correct"],
            # What this many canaries and guesses can show at most: every guess right.
            "ceiling": self._bound(self.guesses, self.guesses, last["delta"]),
            "confidence": self.confidence,
            "rounds": self.rounds,
            "score": SCORE,
            "method": METHOD,
        }

    def progress_line(self) -> str:
        """One line for the server's log; says so when the audited client never sent anything."""
        if not self.rounds:
            return (
                f"Release audit: client-{self.client} sent no accepted update, nothing was audited. Fix: "
                "set audit.release.client to the partition id of a client that trains"
            )
        last = self.rounds[-1]
        return (
            f"Release audit of client-{self.client}: epsilon lower bound {last['epsilon_lower']:.3f} at "
            f"{self.confidence:.0%} confidence, {last['correct']} of {last['guesses']} guesses right over "
            f"{len(self.rounds)} release(s) (claimed: {last['claimed_epsilon']})"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on scoring (see checkpoint.py)."""
        return {"scores": self.scores.tolist(), "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        self.rounds = list(state["rounds"])
