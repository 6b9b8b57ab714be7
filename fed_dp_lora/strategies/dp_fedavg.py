"""DP-FedAvg (McMahan et al. 2018) on LoRA adapters: a user-level (institution-level) guarantee.

Per round: sample clients (fixed-size `fraction` or Poisson with rate q), screen the replies
(CheckedAggregation), clip each accepted client's whole update (adapter minus global adapter)
to C, sum the clipped updates with equal weight, add N(0, (z C)^2) to the sum, divide by a
fixed denominator D (the expected number of sampled clients: q N, or the fixed sample size)
and add the result to the global adapter. One client changes the sum by at most C, so the
round is a Gaussian mechanism with noise multiplier z, accounted over rounds by the RDP
accountant of the subsampled Gaussian (`PrivacyLedger`, history (z, q, 1) per round).

Why not Flower's DifferentialPrivacyServerSide* wrappers around FedAvg (as read in flwr 1.41):
- they add N(0, (z C / m)^2) to FedAvg's num-examples-*weighted* mean of the replies that
  arrived, whose sensitivity is C times the largest weight share, not C / m (and the weights
  are themselves private);
- they skip the whole round on any error reply (one budget refusal or dropout stops training
  for everybody);
- their accountant only supports sampling without amplification, so Poisson client sampling
  cannot be accounted;
- the adaptive wrapper counts *clipped* updates but applies Andrew et al.'s rule written for
  the *unclipped* fraction (so C shrinks when most updates are clipped), and splits the noise
  as if the count's sensitivity were 1/2 while summing uncentred bits (sensitivity 1).
Here every accepted update has weight 1, rejected or missing clients contribute zero (still
within sensitivity C), the denominator is fixed, and adaptive clipping follows Andrew et al.
2021 with centred bits. Clipping is `privacy.user_level.clip_update` (by tensor name, in
float64) rather than Flower's list-based float32 `compute_clip_model_update`, because the same
function clips on the clients under SecAgg+.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_dp_lora.config import ConfigError
from fed_dp_lora.privacy.accountant import ACCOUNTANT_NAMES, PrivacyLedger, calibrate_noise
from fed_dp_lora.privacy.user_level import USER_PRIVACY_UNIT, adaptive_noise_multiplier, clip_update
from fed_dp_lora.strategies.averaging import CheckedAggregation
from fed_dp_lora.strategies.outcome import RoundOutcome


class UserLevelDP:
    """The server-side mechanism and its accounting, independent of how updates arrive.

    Shared by AdapterDPFedAvg (updates seen one by one) and the SecAgg+ strategy (only the sum
    of client-clipped updates is seen).
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float | None,
        epsilon: float | None,
        delta: float | None,
        sampling: str,
        sample_rate: float | None,
        fraction: float,
        min_clients: int,
        rounds: int,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.budget = epsilon
        self.configured_delta = delta
        self.sampling = sampling
        self.sample_rate = sample_rate
        self.fraction = fraction
        self.min_clients = min_clients
        self.rounds = rounds
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.clipped_count_stddev = clipped_count_stddev
        self.population: int | None = None
        self.ledger: PrivacyLedger | None = None
        self.clip_history: list[float] = []
        # Seeded from OS entropy, never from config: a seed known to anyone would let them remove
        # the noise. Its state goes into the server's checkpoint, so a resumed run continues it.
        self._np_rng = np.random.default_rng()

    def state_dict(self) -> dict[str, Any]:
        """Everything planned or learned so far: a resumed run continues, never re-plans."""
        return {
            "population": self.population,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "clip_history": list(self.clip_history),
            "clipped_count_stddev": self.clipped_count_stddev,
            "ledger": None if self.ledger is None else self.ledger.to_dict(),
            "rng": self._np_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.population = state["population"]
        self.noise_multiplier = state["noise_multiplier"]
        self.clip_norm = float(state["clip_norm"])
        self.clip_history = [float(c) for c in state["clip_history"]]
        self.clipped_count_stddev = state["clipped_count_stddev"]
        self.ledger = None if state["ledger"] is None else PrivacyLedger.from_dict(state["ledger"])
        self._np_rng.bit_generator.state = state["rng"]

    # -- planning (first round) -----------------------------------------------------------

    @property
    def _rate(self) -> float:
        if self.sample_rate is None:
            raise ConfigError("strategy.sample_rate: Poisson client sampling needs a rate. Fix: set it in (0, 1]")
        return float(self.sample_rate)

    @property
    def _budget(self) -> float:
        if self.budget is None:
            raise ConfigError(
                "strategy.epsilon: calibrating the noise needs a budget. Fix: set strategy.epsilon "
                "or strategy.noise_multiplier"
            )
        return float(self.budget)

    @property
    def _count_stddev(self) -> float:
        assert self.clipped_count_stddev is not None, "plan() sets it before adaptive clipping runs"
        return float(self.clipped_count_stddev)

    @property
    def accounted_rate(self) -> float:
        """q for the accountant: the Poisson rate, or 1 (no amplification) for fixed-size samples."""
        return self._rate if self.sampling == "poisson" else 1.0

    def denominator(self) -> float:
        """Fixed divisor of the noisy sum: the expected number of sampled clients."""
        assert self.population is not None
        if self.sampling == "poisson":
            return self._rate * self.population
        return float(max(int(self.population * self.fraction), self.min_clients))

    def plan(self, population: int) -> None:
        """Fix N, delta and the noise multiplier on the first round; refuse an invalid delta."""
        if self.population is not None:
            return
        self.population = population
        delta = self.configured_delta if self.configured_delta is not None else 1.0 / (10.0 * population)
        if delta >= 1.0 / population:
            raise ConfigError(
                f"strategy.delta: {delta:g} >= 1/N = {1.0 / population:.3g} for N={population} clients, "
                "which permits releasing one institution's data outright. Fix: use a delta below "
                f"{1.0 / population:.3g}, or null for 1/(10 N)"
            )
        self.ledger = PrivacyLedger("rdp", delta)
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise(self._budget, delta, self.accounted_rate, self.rounds, "rdp")
            log(
                INFO,
                "DP-FedAvg: noise multiplier %.4f calibrated for user-level epsilon %g over %d rounds",
                self.noise_multiplier,
                self.budget,
                self.rounds,
            )
        if self.adaptive:
            if self.clipped_count_stddev is None:
                self.clipped_count_stddev = self.denominator() / 20.0
            try:
                self.update_noise_multiplier()
            except ValueError as err:
                raise ConfigError(
                    f"strategy.clipped_count_stddev: {err}. Fix: raise "
                    "strategy.clipped_count_stddev or lower strategy.noise_multiplier"
                ) from err

    def update_noise_multiplier(self) -> float:
        """Multiplier on the update sum (smaller than z when adaptive clipping spends some)."""
        assert self.noise_multiplier is not None
        if not self.adaptive:
            return self.noise_multiplier
        return adaptive_noise_multiplier(self.noise_multiplier, self._count_stddev)

    def budget_problem(self) -> str | None:
        """Why the next round may not run (its release would exceed the user-level budget)."""
        assert self.ledger is not None and self.noise_multiplier is not None
        if self.budget is None:
            return None
        after = self.ledger.epsilon((self.noise_multiplier, self.accounted_rate, 1))
        if after > self._budget * (1 + 1e-9):
            return (
                f"user-level budget: epsilon would reach {after:.3f} > strategy.epsilon={self.budget:g}; "
                "no further round is run"
            )
        return None

    def sample(self, nodes: list[int]) -> list[int]:
        """Poisson: each node independently with probability q; fraction: a fixed-size sample."""
        if self.sampling == "poisson":
            return [n for n in nodes if self._np_rng.random() < self._rate]
        size = min(len(nodes), int(self.denominator()))
        return [nodes[i] for i in sorted(self._np_rng.choice(len(nodes), size=size, replace=False))]

    # -- the release ----------------------------------------------------------------------

    def release(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        clipped_sum: dict[str, np.ndarray],
        num_contributions: int,
        unclipped_count: int | None,
        sampled: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(global + (sum + N(0, (z_u C)^2)) / D, what was applied); then account the round and adapt C."""
        assert self.noise_multiplier is not None and self.ledger is not None
        denominator = self.denominator()
        std_sum = self.update_noise_multiplier() * self.clip_norm
        new = {
            k: (
                global_arrays[k].astype(np.float64)
                + (clipped_sum[k] + self._np_rng.normal(0.0, std_sum, size=clipped_sum[k].shape)) / denominator
            ).astype(global_arrays[k].dtype)
            for k in global_arrays
        }
        used_clip = self.clip_norm
        info: dict[str, Any] = {
            "clip_norm": used_clip,
            "noise_std_on_sum": std_sum,
            "noise_std_on_mean": std_sum / denominator,
            "denominator": denominator,
            "sampled": sampled,
            "aggregated": num_contributions,
        }
        if self.adaptive and unclipped_count is not None:
            # Centred bits (b - 1/2): one client moves the sum by at most 1/2.
            noisy = unclipped_count - num_contributions / 2.0 + self._np_rng.normal(0.0, self._count_stddev)
            unclipped_fraction = noisy / denominator + 0.5
            self.clip_norm *= math.exp(-self.clip_lr * (unclipped_fraction - self.target_quantile))
            info.update({"noisy_unclipped_fraction": unclipped_fraction, "next_clip_norm": self.clip_norm})
        self.clip_history.append(used_clip)
        self.ledger.record(self.noise_multiplier, self.accounted_rate, 1)
        info["user_epsilon"] = self.ledger.epsilon()
        log(
            INFO,
            "Round %d: DP-FedAvg clip=%.4g noise std (mean)=%.4g user epsilon=%.4f",
            server_round,
            used_clip,
            std_sum / denominator,
            info["user_epsilon"],
        )
        return new, info

    def summary(self) -> dict[str, Any]:
        assert self.ledger is not None
        eps = self.ledger.epsilon()
        return {
            "enabled": True,
            "unit": USER_PRIVACY_UNIT,
            "covers": "the global adapters of every round (and anything computed from them); the "
            "per-client metrics, failures and byte counts the server logs are not covered",
            "accountant": ACCOUNTANT_NAMES["rdp"],
            "epsilon": eps if math.isfinite(eps) else "inf",
            "delta": self.ledger.delta,
            "budget": self.budget,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier(),
            "sampling": self.sampling,
            "sample_rate": self.accounted_rate,
            "amplification": "Poisson subsampling"
            if self.sampling == "poisson"
            else "none claimed (fixed-size sample)",
            "population": self.population,
            "rounds": self.ledger.steps,
            "clip_norm": self.clip_history if self.adaptive else (self.clip_history or [self.clip_norm])[0],
            "adaptive_clipping": self.adaptive,
        }


class AdapterDPFedAvg(CheckedAggregation, FedAvg):
    """DP-FedAvg with server-side clipping of every accepted update (see module docstring)."""

    def __init__(self, dp: UserLevelDP, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dp = dp
        self._skip_reason: str | None = None
        self._sampled = 0

    def state_dict(self) -> dict:
        return {"dp": self.dp.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dp.load_state_dict(state["dp"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.online_nodes(grid)
        self.dp.plan(len(nodes))
        self._sent = (arrays, 0)
        self._skip_reason = self.dp.budget_problem()
        if self._skip_reason is not None:
            log(WARNING, "Round %d: %s", server_round, self._skip_reason)
            self.stop_reason = self._skip_reason
            return []
        node_ids = self.dp.sample(list(nodes))
        self._sampled = len(node_ids)
        log(INFO, "configure_train: DP-FedAvg sampled %d of %d nodes (%s)", len(node_ids), len(nodes), self.dp.sampling)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, node_ids, MessageType.TRAIN))
        self._sent = (arrays, len(messages))
        self._outgoing = messages
        return messages

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        if self._skip_reason is not None:
            return RoundOutcome(server_round, failures={"server": self._skip_reason}, stop_reason=self.stop_reason)
        # Dropped and rejected clients count as zero against the fixed denominator: no minimum.
        accepted, outcome = self.screen(server_round, list(replies), enforce_minimum=False)
        assert self._sent is not None, "configure_train ran first"
        global_arrays = {k: v.numpy() for k, v in self._sent[0].items()}
        clipped_sum, unclipped = self._clipped_sum(accepted, global_arrays)
        new, outcome.strategy = self.dp.release(
            server_round, global_arrays, clipped_sum, len(accepted), unclipped, self._sampled
        )
        outcome.user_level = self.dp.summary()
        outcome.arrays = ArrayRecord({k: Array(v) for k, v in new.items()})
        outcome.metrics = (
            self.train_metrics_aggr_fn([r.content for r in accepted], self.weighted_by_key) if accepted else None
        )
        outcome.stop_reason = self.stop_reason
        return outcome

    def _clipped_sum(
        self, accepted: list[Message], global_arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int]:
        """(sum of the accepted updates, each clipped to C in float64; how many were within C)."""
        clipped_sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_arrays.items()}
        unclipped = 0
        for reply in accepted:
            arrays = reply.content.array_records[self.arrayrecord_key]
            update = {k: arrays[k].numpy().astype(np.float64) - global_arrays[k] for k in global_arrays}
            clipped, norm = clip_update(update, self.dp.clip_norm)
            unclipped += int(norm <= self.dp.clip_norm)
            for k in clipped_sum:
                clipped_sum[k] += clipped[k]
        return clipped_sum, unclipped
