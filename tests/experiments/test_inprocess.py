"""A whole federation in one process with the audit and the tracker on: what a run writes.

On the tiny BERT (tests/tiny_models.py): what a run writes does not depend on the weights.
"""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fed_dp_lora import local_log
from fed_dp_lora.experiments.inprocess import run_federation
from fed_dp_lora.node_policy import simulation_state_dir

TINY = ("+preset=tiny rounds=2 train.batch_size=16 train.epochs=0.02 privacy.noise_multiplier=1.0 "
        "audit.enabled=true audit.canaries=40 tracking.backend=tensorboard eval.interval=2")


def test_run_writes_audit_report_and_tracker(tmp_path, tiny_models):
    summary = run_federation(" ".join((TINY, *tiny_models.classifier)), 2, tmp_path)

    audit = summary["privacy"]["audit"]
    assert {"epsilon_lower", "canaries", "confidence"} <= audit.keys()
    assert audit["canaries"] == 40 and audit["confidence"] == 0.95 and audit["guesses"] == 8
    eps = summary["privacy"]["epsilon"]
    assert audit["claimed_epsilon"] == max(eps.values()) and audit["delta"] > 0
    assert 0 <= audit["epsilon_lower"] <= audit["claimed_epsilon"]
    assert json.loads((tmp_path / "summary.json").read_text())["privacy"]["audit"] == audit

    html = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    for client, value in eps.items():
        assert client in html and f"{value:.4g}" in html
    assert "Privacy audit" in html and "Privacy audit" in md
    assert md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1  # one row per round
    assert all((tmp_path / f"report-{p}.png").stat().st_size > 1000 for p in ("metrics", "epsilon", "bytes"))

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # eval.interval=2: round 1 is trained and reported without central metrics, round 2 evaluated.
    assert "metrics" not in summary["rounds"][0] and "balanced_accuracy" in summary["rounds"][1]["metrics"]
    assert [e.step for e in events.Scalars("eval/balanced_accuracy")] == [2]
    assert [e.step for e in events.Scalars("bytes/up")] == [1, 2]
    assert {f"epsilon/{c}" for c in eps} <= set(events.Tags()["scalars"])


def test_rounds_record_where_the_time_went(tmp_path, tiny_models):
    """The server times its side; each client times its own in its local log, never in its reply."""
    summary = run_federation(" ".join(("+preset=tiny rounds=2 train.batch_size=16 train.epochs=0.02 "
                                       "privacy.noise_multiplier=1.0", *tiny_models.classifier)), 2, tmp_path)
    for entry in summary["rounds"]:
        assert {"clients", "aggregate", "evaluate", "save"} <= entry["timing"].keys()
        assert not any("seconds" in key for m in entry["clients"].values() for key in m)
    for partition in (0, 1):
        logged = local_log.read(simulation_state_dir(summary["run"]["study"], partition))
        assert [e["round"] for e in logged] == [1, 2]
        for entry, event in zip(summary["rounds"], logged):
            assert {"load-seconds", "train-seconds", "startup-seconds"} <= event.keys()
            assert entry["timing"]["clients"] >= event["train-seconds"]
