"""Run outputs: per-round records, the progress line, and summary.json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fed_dp_lora.files import write_atomic
from fed_dp_lora.privacy.accountant import ACCOUNTANT_NAMES
from fed_dp_lora.privacy.user_level import USER_PRIVACY_UNIT
from fed_dp_lora.reply import DELTA, EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS_TOTAL

if TYPE_CHECKING:  # the report records what the strategies return; it never imports them at run time
    from fed_dp_lora.strategies.outcome import RoundOutcome

PRIVACY_UNIT = "record: one row (one sequence) of one client's data; epsilon is per client"
RELATION = (
    "add/remove one record of one institution (its record count is private: sampling rate, steps, "
    "delta and aggregation weights come from the count it declares publicly, node-config `records`)"
)
REPLY = "only the keys of fed_dp_lora/reply.py: the adapter, public or accounted metrics, fixed error texts"

SECRET_NOISE = "a secret key per client and run (never sent): nobody else can reproduce the noise"
SEEDED_NOISE = (
    "derived from the run's `seed` (privacy.seeded_noise=true): reproducible, so the guarantee "
    "holds only against parties who do not know the seed"
)


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


class RunReport:
    """Collects what the server sees each round and writes summary.json after every round."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.config = config
        self.rounds: list[dict[str, Any]] = []
        self.clients: dict[str, dict[str, float]] = {}  # latest privacy figures per client
        self.majority_baseline: dict[str, float] | None = None
        self.user_level: dict[str, Any] | None = None  # set by DP-FedAvg: the user-level guarantee
        self.audit: dict[str, Any] | None = None  # the input-canary audit of the final global adapter
        self.release_audit: dict[str, Any] | None = None  # the audit of one client's releases
        self.run: dict[str, Any] = {"study": None, "resumed_after_round": [], "stopped": None}
        self.started = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on writing the same summary (see checkpoint.py)."""
        return {
            "rounds": self.rounds,
            "clients": self.clients,
            "user_level": self.user_level,
            "run": self.run,
            "elapsed": time.time() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = list(state["rounds"])
        self.clients = dict(state["clients"])
        self.user_level = state["user_level"]
        self.run = dict(state["run"])
        self.started = time.time() - float(state["elapsed"])  # `seconds` counts running time only

    def record_round(self, outcome: RoundOutcome) -> None:
        """Everything an aggregator returned about one round (strategies/outcome.py)."""
        self.record_train(outcome.server_round, outcome.clients, outcome.failures, outcome.bytes_up, outcome.bytes_down)
        if outcome.strategy:
            self.record_strategy(outcome.server_round, outcome.strategy)
        if outcome.timing:
            self.record_timing(outcome.server_round, outcome.timing)
        if outcome.nodes is not None:
            self.run["nodes"] = outcome.nodes
        if outcome.user_level is not None:
            self.user_level = outcome.user_level
        if outcome.stop_reason is not None:
            self.run["stopped"] = outcome.stop_reason

    def record_train(
        self,
        server_round: int,
        clients: dict[str, dict[str, float]],
        failures: dict[str, str],
        bytes_up: int,
        bytes_down: int,
    ) -> None:
        """Metrics of the clients that trained, and why the others did not count."""
        for name, metrics in clients.items():
            self.clients.setdefault(name, {}).update(metrics)
        self.rounds.append(
            {
                "round": server_round,
                "seconds": round(time.time() - self.started, 1),
                "clients": clients,
                "failures": failures,
                "bytes": {"up": bytes_up, "down": bytes_down},
                "epsilon": {n: _finite(m[EPSILON]) for n, m in clients.items() if EPSILON in m},
            }
        )

    def record_strategy(self, server_round: int, info: dict[str, Any]) -> None:
        """What the strategy decided in a recorded round (selected clients, clip norm, noise)."""
        entry = next(r for r in self.rounds if r["round"] == server_round)
        entry.setdefault("strategy", {}).update(info)

    def record_timing(self, server_round: int, seconds: dict[str, float]) -> None:
        """Where the server's round went: waiting for clients, aggregating, evaluating, writing."""
        entry = next((r for r in self.rounds if r["round"] == server_round), None)
        if entry is not None:
            entry.setdefault("timing", {}).update({k: round(v, 3) for k, v in seconds.items()})

    def record_eval(self, server_round: int, metrics: dict[str, float]) -> None:
        entry = next((r for r in self.rounds if r["round"] == server_round), None)
        if entry is None:
            return  # round 0: the initial adapter, before any training
        entry["metrics"] = metrics

    def progress_line(self, server_round: int, total_rounds: int) -> str:
        """One line a person reads: round, metrics, worst client epsilon, bytes, time."""
        entry = next(r for r in self.rounds if r["round"] == server_round)
        shown = ("balanced_accuracy", "accuracy", "macro_f1", "auc", "loss", "perplexity")
        metrics = " ".join(f"{k}={entry['metrics'][k]:.4f}" for k in shown if k in entry.get("metrics", {}))
        eps = [m[EPSILON] for m in self.clients.values() if EPSILON in m]
        eps_text = f"max client epsilon={max(eps):.3f}" if eps else "privacy off"
        if self.user_level is not None:
            user = self.user_level["epsilon"]
            eps_text += f" | user epsilon={user:.3f}" if isinstance(user, float) else f" | user epsilon={user}"
        failed = f" failed={len(entry['failures'])}" if entry["failures"] else ""
        return (
            f"[round {server_round}/{total_rounds}] {metrics} | {eps_text} | clients={len(entry['clients'])}"
            f"{failed} | up={entry['bytes']['up'] / 1e6:.2f}MB down={entry['bytes']['down'] / 1e6:.2f}MB"
            f" | {entry.get('seconds', 0):.0f}s"
        )

    def claim(self) -> tuple[float | None, float]:
        """(largest client epsilon, largest client delta) as claimed; (None, 0) with privacy off."""
        eps = [m[EPSILON] for m in self.clients.values() if EPSILON in m]
        deltas = [m[DELTA] for m in self.clients.values() if DELTA in m]
        if not self.config["privacy"]["enabled"] or not eps:
            return None, 0.0
        return max(eps), max(deltas)

    def summary(self) -> dict[str, Any]:
        privacy = self.config["privacy"]
        per_client = lambda key: {n: m[key] for n, m in sorted(self.clients.items()) if key in m}  # noqa: E731
        final = dict(next((r["metrics"] for r in reversed(self.rounds) if "metrics" in r), {}))
        if self.majority_baseline is not None:
            final["majority_baseline"] = self.majority_baseline
        return {
            "config": self.config,
            "run": self.run,
            "rounds": self.rounds,
            "final": final,
            "privacy": {
                "enabled": bool(privacy["enabled"]),
                "unit": PRIVACY_UNIT,
                "relation": RELATION,
                "client_replies": REPLY,
                "accountant": ACCOUNTANT_NAMES[privacy["accountant"]],
                "budget": privacy["epsilon"],
                "delta": per_client(DELTA),
                "epsilon": {n: _finite(e) for n, e in per_client(EPSILON).items()},
                "noise_multiplier": per_client(NOISE_MULTIPLIER),
                "sample_rate": per_client(SAMPLE_RATE),
                "steps": per_client(STEPS_TOTAL),
                "clip_norm": privacy["clip_norm"],
                "noise_source": SEEDED_NOISE if privacy.get("seeded_noise") else SECRET_NOISE,
                "user_level": self.user_level or {"enabled": False, "unit": USER_PRIVACY_UNIT},
                **({"audit": self._audits()} if self.audit is not None or self.release_audit is not None else {}),
            },
            "communication": {
                "up": sum(r["bytes"]["up"] for r in self.rounds),
                "down": sum(r["bytes"]["down"] for r in self.rounds),
                "per_round": [{"round": r["round"], **r["bytes"]} for r in self.rounds],
            },
        }

    def _audits(self) -> dict[str, Any]:
        """privacy.audit: the input-canary audit's fields, and `release` for the release audit."""
        release = {"release": self.release_audit} if self.release_audit is not None else {}
        return {**(self.audit or {}), **release}

    def write(self) -> Path:
        return write_atomic(self.out_dir / "summary.json", json.dumps(self.summary(), indent=2).encode())
