"""What an aggregator did in one round: returned by every strategy, recorded by the server's run.

Strategies never write the run report: they return a RoundOutcome and the caller (the round
loop in rounds.py, or the SecAgg+ strategy's `record` callback under Flower's legacy workflow)
hands it to `RunReport.record_round`. Data flows one way: replies -> strategy -> outcome -> report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord


@dataclass
class RoundOutcome:
    """One round's aggregation: the new global adapter (None keeps the old one) and the facts."""

    server_round: int
    arrays: ArrayRecord | None = None
    metrics: MetricRecord | None = None
    clients: dict[str, dict[str, float]] = field(default_factory=dict)  # accepted clients' reply metrics
    failures: dict[str, str] = field(default_factory=dict)  # name -> why it did not count ("server": the round)
    bytes_up: int = 0
    bytes_down: int = 0
    strategy: dict[str, Any] = field(default_factory=dict)  # what the strategy decided (selected, clip, noise)
    nodes: dict[str, int] | None = None  # institution name -> node id, as known this round
    user_level: dict[str, Any] | None = None  # DP-FedAvg: the user-level guarantee after this round
    stop_reason: str | None = None  # set when no further round can succeed
    timing: dict[str, float] = field(default_factory=dict)  # the round loop's seconds (clients, aggregate)
