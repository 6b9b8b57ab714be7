"""The round loop: Flower's Strategy.start, able to begin at any round.

Flower's `Strategy.start` always counts from round 1 and offers no hook after a round, so a
stopped run could not continue from its checkpoint; this loop calls the same strategy
methods (configure_train, send_and_receive, then aggregate_round, which is aggregate_train
returning what happened) and hands the round's outcome to `after_round`. Clients are
evaluated centrally by the server (`fraction_evaluate=0`), so there is no client-side evaluation
phase to run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fed_dp_lora.strategies.averaging import CheckedAggregation
from fed_dp_lora.strategies.outcome import RoundOutcome


def run_rounds(
    strategy: CheckedAggregation,
    grid: Grid,
    arrays: ArrayRecord,
    rounds: range,
    train_config: ConfigRecord,
    timeout: float,
    after_round: Callable[[int, ArrayRecord, RoundOutcome], None],
) -> ArrayRecord:
    """Run `rounds`; stop early (cleanly) when the strategy says no further round can succeed."""
    for server_round in rounds:
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, rounds.stop - 1)
        started = time.perf_counter()
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        received = time.perf_counter()
        outcome = strategy.aggregate_round(server_round, replies)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        outcome.timing.update({"clients": received - started, "aggregate": time.perf_counter() - received})
        after_round(server_round, arrays, outcome)
        if outcome.stop_reason is not None:
            log(WARNING, "Stopping after round %d: %s", server_round, outcome.stop_reason)
            break
    return arrays
