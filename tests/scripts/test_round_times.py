"""scripts/round_times.py: the breakdown it prints is computed correctly from summary.json and local logs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "round_times.py"
spec = importlib.util.spec_from_file_location("round_times", SCRIPT)
round_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(round_times)


def timings(train: float, startup: float) -> dict:
    return {"startup-seconds": startup, "load-seconds": 1.0, "train-seconds": train, "serialize-seconds": 0.0}


def entry(r: int, clients: float, train: float, startup: float) -> dict:
    return {"round": r, "timing": {"clients": clients, "aggregate": 1.0, "evaluate": 8.0, "save": 1.0},
            "clients": {"a": timings(train, startup), "b": timings(train, startup)}}


def summary(study: str = "s1") -> dict:
    return {"run": {"study": study},
            "rounds": [entry(1, 500.0, 1.0, 99.0), entry(2, 90.0, 30.0, 9.0), entry(3, 90.0, 30.0, 9.0)]}


def test_breakdown_skips_round_one_and_multiplies_the_shares():
    s = summary()
    b = round_times.breakdown(s, round_times.client_entries(s, []))
    assert b["rounds"] == 2 and b["wall"] == 100.0 and b["startup"] == 9.0
    assert b["train_share_of_clients"] == pytest.approx(30 / 40)
    assert b["train_share"] == pytest.approx(0.9 * 0.75)
    assert b["startup_load_share"] == pytest.approx(10 / 40)


def test_the_institutions_local_logs_are_read_for_this_study_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path / "nowhere"))
    s = summary("s1")
    for i in range(2):
        state = tmp_path / f"state-{i}"
        state.mkdir()
        lines = [{"study": "s1", "round": r, **timings(20.0, 0.5), "train-loss": 0.3} for r in (1, 2, 3)]
        lines.append({"study": "other", "round": 2, **timings(1.0, 500.0)})  # another run in the same state dir
        (state / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    clients = round_times.client_entries(s, [tmp_path / "state-0", tmp_path / "state-1"])
    assert len(clients) == 6 and {c["study"] for c in clients} == {"s1"}
    b = round_times.breakdown(s, clients)
    assert b["startup"] == 0.5 and b["train"] == 20.0  # the local logs, not summary.json's 9 s / 30 s
    assert b["startup_load_share"] == pytest.approx(1.5 / 21.5)


def test_a_simulation_s_local_logs_are_found_from_its_study(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path))
    partition = tmp_path / "simulation" / "s9" / "partition-0"
    partition.mkdir(parents=True)
    (partition / "rounds.jsonl").write_text(json.dumps({"study": "s9", "round": 2, **timings(5.0, 0.0)}) + "\n")
    clients = round_times.client_entries(summary("s9"), [])
    assert clients == [{"study": "s9", "round": 2, **timings(5.0, 0.0)}]
