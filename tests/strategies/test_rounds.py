"""The round loop: rounds from any start, the minimum of accepted updates, the clean stop."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fed_dp_lora.config import to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.strategies.rounds import run_rounds
from fed_dp_lora.reply import Refusal
from tests.strategies.helpers import error_reply, filled, reply_with

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = {"layer.lora_A": torch.zeros(2, 4), "layer.lora_B": torch.zeros(4, 2)}
BUDGET = error_reply(Refusal.BUDGET, "privacy budget exhausted: epsilon would reach 8.1 > budget 8")


def run(tmp_path, make_cfg, handlers, rounds: range, minimum: int = 2):
    cfg = make_cfg(f"strategy.min_train_clients={minimum}", "strategy.min_available_clients=1")
    report = RunReport(tmp_path, to_plain(cfg))
    strategy = build_strategy(cfg)
    done: list[int] = []

    def after_round(server_round, _, outcome):
        done.append(server_round)
        report.record_round(outcome)

    final = run_rounds(strategy, InProcessGrid(handlers), ArrayRecord(REFERENCE), rounds,
                       ConfigRecord({"study-id": "s"}), 10.0, after_round)
    return report, strategy, done, final.to_torch_state_dict()


def test_rounds_start_where_asked_and_carry_the_round_number(tmp_path, make_cfg):
    grid_rounds = []

    def spy(msg):
        grid_rounds.append((msg.content["config"]["server-round"], msg.content["config"]["study-id"]))
        return reply_with(filled(REFERENCE, 1.0))(msg)

    report, _, done, _ = run(tmp_path, make_cfg, {1: spy, 2: spy}, range(3, 5))
    assert done == [3, 4] and [r["round"] for r in report.rounds] == [3, 4]
    assert grid_rounds == [(3, "s"), (3, "s"), (4, "s"), (4, "s")]


def test_too_few_accepted_updates_keep_the_adapter_and_the_run_goes_on(tmp_path, make_cfg):
    handlers = {1: reply_with(filled(REFERENCE, 1.0)), 2: error_reply(Refusal.CONFIG, "DataError: bad file"),
                3: BUDGET}
    report, strategy, done, final = run(tmp_path, make_cfg, handlers, range(1, 3))
    assert done == [1, 2] and strategy.stop_reason is None  # 3 sent - 1 out of budget = 2 could train
    assert all(torch.equal(final[k], REFERENCE[k]) for k in REFERENCE)
    assert "fewer than strategy.min_train_clients=2" in report.rounds[0]["failures"]["server"]
    assert report.rounds[0]["clients"].keys() == {"node-1"}  # still reported, just not aggregated


def test_the_run_stops_cleanly_when_budgets_leave_too_few_clients(tmp_path, make_cfg):
    handlers = {1: reply_with(filled(REFERENCE, 1.0)), 2: BUDGET, 3: BUDGET}
    report, strategy, done, _ = run(tmp_path, make_cfg, handlers, range(1, 4))
    assert done == [1], "no further round is run once it cannot succeed"
    assert "2 of 3 clients are out of privacy budget" in strategy.stop_reason
    _, _, done, final = run(tmp_path, make_cfg, handlers, range(1, 4), minimum=1)
    assert done == [1, 2, 3] and torch.equal(final["layer.lora_A"], torch.ones(2, 4))
