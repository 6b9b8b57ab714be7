"""Hand-built nodes for in-process strategy tests: replies with known tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.logger import FLOWER_LOGGER

from fed_dp_lora.experiments.inprocess import Handler, InProcessGrid
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies.outcome import RoundOutcome
from fed_dp_lora.strategies.rounds import run_rounds


def reply_with(arrays: dict[str, torch.Tensor], num_examples: int = 10, **metrics) -> Handler:
    """A node that answers every train message with these tensors and metrics."""

    def handle(msg: Message) -> Message:
        record = MetricRecord({"num-examples": num_examples, "train-loss": 0.5, **metrics})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": record}), reply_to=msg)

    return handle


def error_reply(code: int, reason: str) -> Handler:
    return lambda msg: Message(Error(code=code, reason=reason), reply_to=msg)


def filled(reference: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in reference.items()}


@dataclass
class Ran:
    arrays: ArrayRecord  # the final global adapter
    outcomes: list[RoundOutcome]  # what the strategy returned, round by round


def run_strategy(strategy, grid: InProcessGrid, initial: dict, report: RunReport | None = None,
                 rounds: int = 1) -> Ran:
    """Our round loop, as the ServerApp runs it: each round's outcome is recorded in `report`
    (strategies return what happened; they never write the report). The study id is what our
    ServerApp sends every client."""
    outcomes: list[RoundOutcome] = []

    def after_round(server_round: int, arrays: ArrayRecord, outcome: RoundOutcome) -> None:
        outcomes.append(outcome)
        if report is not None:
            report.record_round(outcome)

    arrays = run_rounds(strategy, grid, ArrayRecord(initial), range(1, rounds + 1),
                        ConfigRecord({"study-id": "test-study"}), 3600.0, after_round)
    return Ran(arrays, outcomes)


class LogRecords(logging.Handler):
    """Keeps the records Flower's logger emits (the strategies log through it)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.WARNING]

    def __enter__(self) -> "LogRecords":
        FLOWER_LOGGER.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        FLOWER_LOGGER.removeHandler(self)
