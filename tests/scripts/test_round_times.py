"""scripts/round_times.py: the breakdown it prints is computed from summary.json correctly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "round_times.py"
spec = importlib.util.spec_from_file_location("round_times", SCRIPT)
round_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(round_times)


def entry(r: int, clients: float, train: float, startup: float) -> dict:
    client = {"startup-seconds": startup, "load-seconds": 1.0, "train-seconds": train, "serialize-seconds": 0.0}
    return {"round": r, "timing": {"clients": clients, "aggregate": 1.0, "evaluate": 8.0, "save": 1.0},
            "clients": {"a": dict(client), "b": dict(client)}}


def test_breakdown_skips_round_one_and_multiplies_the_shares():
    summary = {"rounds": [entry(1, 500.0, 1.0, 99.0), entry(2, 90.0, 30.0, 9.0), entry(3, 90.0, 30.0, 9.0)]}
    b = round_times.breakdown(summary)
    assert b["rounds"] == 2 and b["wall"] == 100.0 and b["startup"] == 9.0
    assert b["train_share_of_clients"] == pytest.approx(30 / 40)
    assert b["train_share"] == pytest.approx(0.9 * 0.75)
