"""The offline tracker: what is logged can be read back from TensorBoard's event files."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fed_dp_lora.tracking import Tracker, make_tracker


def entry(rnd: int, bal: float, eps: float) -> dict:
    return {"round": rnd, "clients": {"client-0": {}, "client-1": {}}, "failures": {"client-2": "x"},
            "bytes": {"up": 1000 * rnd, "down": 2000}, "epsilon": {"client-0": eps},
            "metrics": {"balanced_accuracy": bal}}


def test_tensorboard_holds_metrics_epsilon_bytes_and_config(tmp_path):
    tracker = make_tracker("tensorboard", tmp_path)
    tracker.log_config({"privacy": {"epsilon": 8}})
    tracker.log_round(entry(1, 0.6, 2.5))
    tracker.log_round(entry(2, 0.65, 3.5))
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]  # noqa: E731
    assert scalars("eval/balanced_accuracy") == [(1, 0.6), (2, 0.65)]
    assert scalars("epsilon/client-0") == [(1, 2.5), (2, 3.5)]
    assert scalars("bytes/up") == [(1, 1000), (2, 2000)]
    assert scalars("clients/trained") == [(1, 2), (2, 2)] and scalars("clients/failed") == [(1, 1), (2, 1)]
    assert events.Tags()["tensors"] == ["config/text_summary"]


def test_no_backend_writes_nothing(tmp_path):
    tracker = make_tracker("none", tmp_path)
    assert type(tracker) is Tracker
    tracker.log_round(entry(1, 0.6, 2.5))
    tracker.close()
    assert list(tmp_path.iterdir()) == []
