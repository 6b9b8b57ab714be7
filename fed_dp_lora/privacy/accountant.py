"""The per-client privacy ledger: every (noise, sample rate, steps) the client actually ran.

Epsilon is always recomputed from the whole history with an Opacus accountant, so rounds
compose instead of resetting, whatever process runs the next round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
# Opacus' default RDP orders stop at 63; at epsilon >= ~5 the best order lies beyond that and
# the bound is needlessly loose (Opacus warns "Optimal order is the largest alpha").
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 257, 4)) + [320, 512, 1024]
ACCOUNTANT_NAMES = {
    "rdp": "Opacus RDPAccountant (Renyi DP of the Poisson-subsampled Gaussian mechanism)",
    "prv": "Opacus PRVAccountant (privacy random variables, numerical composition)",
}


class BudgetExceeded(RuntimeError):
    """Training would take the client's epsilon past its budget."""


def _epsilon_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


History = tuple[tuple[float, float, int], ...]  # (noise multiplier, sample rate, steps) entries
# A budget that needs more noise than this for the planned steps is treated as spent: the
# update would be noise (at sigma = 100 and C = 10, a batch of 128 gets noise of std ~8 per
# coordinate against a signal of at most 10 / 128 per record).
MAX_NOISE = 100.0


@lru_cache(maxsize=64)  # a binary search over the accountant: seconds, so once per plan
def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, history: History = ()
) -> float:
    """Smallest noise multiplier whose epsilon after `history` plus `steps` steps stays within `epsilon`.

    `history` is what was already spent (an institution's earlier studies): the new steps get
    what is left. Raises BudgetExceeded when nothing is left.
    """
    if not history:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
                **_epsilon_kwargs(accountant),
            )
        )
        if sigma > MAX_NOISE:
            raise BudgetExceeded(
                f"privacy budget too small: epsilon {epsilon:g} would need a noise multiplier "
                f"of {sigma:.3g} (> {MAX_NOISE:g}) for the planned steps"
            )
        return sigma
    ledger = PrivacyLedger(accountant, delta, list(history))

    def within(sigma: float) -> bool:
        return ledger.epsilon((sigma, sample_rate, steps)) <= epsilon

    if not within(MAX_NOISE):
        raise BudgetExceeded(
            f"privacy budget exhausted: {ledger.epsilon():.3f} of epsilon {epsilon:g} is "
            f"already spent; the planned steps would need a noise multiplier above {MAX_NOISE:g}"
        )
    low, high = 0.0, 1.0
    while not within(high):
        low, high = high, high * 2
    while high - low > 1e-3 * high:  # the same relative precision Opacus' search reaches
        mid = (low + high) / 2
        low, high = (low, mid) if within(mid) else (mid, high)
    return high


@dataclass
class PrivacyLedger:
    """Composition history of one client; serializable to plain lists for context.state."""

    accountant: str
    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the server round of each history entry

    def epsilon(self, planned: tuple[float, float, int] | None = None) -> float:
        """Epsilon spent so far, or after also running `planned` = (noise, rate, steps)."""
        history = self.history + ([planned] if planned else [])
        history = [h for h in history if h[2] > 0]
        if not history:
            return 0.0
        acc = ACCOUNTANTS[self.accountant]()
        acc.history = [(float(n), float(q), int(s)) for n, q, s in history]
        eps = float(acc.get_epsilon(delta=self.delta, **_epsilon_kwargs(self.accountant)))
        # The RDP conversion can dip below zero for tiny losses; epsilon is never negative.
        return max(0.0, eps) if math.isfinite(eps) else math.inf

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def check_budget(self, planned: tuple[float, float, int], budget: float | None) -> float:
        """Epsilon after `planned`; raise BudgetExceeded (before training) if over `budget`."""
        after = self.epsilon(planned)
        if budget is not None and after > budget * (1 + 1e-9):
            raise BudgetExceeded(
                f"privacy budget exhausted: epsilon would reach {after:.3f} > budget {budget:g} "
                f"(spent {self.epsilon():.3f} over {self.steps} steps). Refusing to train; raise "
                "privacy.epsilon for a new run, or stop this client"
            )
        return after

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, server_round: int = 0) -> None:
        """Add steps actually taken (one entry per round; composition is order-free)."""
        if steps > 0:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
            self.rounds.append(int(server_round))

    def extends(self, other: PrivacyLedger) -> bool:
        """True when this ledger is `other` plus later entries (same settings)."""
        n = len(other.history)
        return (
            (self.accountant, self.delta) == (other.accountant, other.delta)
            and self.history[:n] == other.history
            and self.rounds[:n] == other.rounds
        )

    def to_dict(self) -> dict[str, str | float | list[float] | list[int]]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "noise": [h[0] for h in self.history],
            "rate": [h[1] for h in self.history],
            "steps": [h[2] for h in self.history],
            "rounds": list(self.rounds),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        history = list(zip(map(float, data["noise"]), map(float, data["rate"]), map(int, data["steps"]), strict=True))
        rounds = [int(r) for r in data.get("rounds", [0] * len(history))]
        if len(rounds) != len(history):
            raise ValueError(f"ledger has {len(history)} entries but {len(rounds)} round numbers")
        return cls(accountant=str(data["accountant"]), delta=float(data["delta"]), history=history, rounds=rounds)
