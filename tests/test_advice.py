"""The server's advice: a run heading for the majority class, and a sequence length that cuts texts."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fed_dp_lora.advice import length_report, majority_warning


def test_the_majority_warning_fires_at_chance_and_names_what_to_change(make_cfg):
    lora = make_cfg("data=file", "data.path=/x.csv")  # the tiny preset is LoRA; a file has no class weights
    text = majority_warning(lora, {"balanced_accuracy": 0.5}, 2)
    assert text and "recipe=linear-probe" in text and "data.class_weights" in text and "privacy.epsilon" in text
    probe = make_cfg("recipe=linear-probe", "privacy=none")
    text = majority_warning(probe, {"balanced_accuracy": 0.502}, 2)
    assert text and "train.lr" in text and "privacy.epsilon" not in text
    assert majority_warning(probe, {"balanced_accuracy": 0.55}, 2) is None
    assert majority_warning(probe, {"balanced_accuracy": 0.335}, 3) is not None


def test_the_length_report_warns_when_max_length_cuts_a_quarter():
    lengths = np.arange(1, 201)
    info, warning = length_report(lengths, 190)
    assert "median 100" in info and warning is None
    _, warning = length_report(lengths, 64)
    assert warning and "train.max_length=150" in warning


@pytest.mark.usefixtures("task_identity")
def test_a_federation_predicting_one_class_gets_the_warning_in_the_server_log(tmp_path, caplog):
    """A real in-process run whose head cannot move (lr 1e-30): every logit ties, class 0 wins."""
    from fed_dp_lora.experiments.inprocess import run_federation

    overrides = ("+preset=tiny recipe=linear-probe privacy=none train.lr=1e-30 train.epochs=0.05 "
                 "data.test_fraction=0.9 strategy.min_available_clients=1 strategy.min_train_clients=1")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        summary = run_federation(overrides, 1, tmp_path / "run")
    assert summary["final"]["balanced_accuracy"] == 0.5
    assert any("predicts one class" in r.getMessage() and "train.lr" in r.getMessage() for r in caplog.records)
