"""Simulated attackers: who is malicious, what each attack sends, and that the server sees it."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fed_dp_lora.attacks import attack, is_malicious, malicious_partitions
from fed_dp_lora.client_app import app as client_app
from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.client_data import cached_model
from fed_dp_lora.models import trainable_state
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from tests.strategies.helpers import run_strategy

GLOBAL = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.5, 0.5, 0.5])}
LOCAL = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([0.5, 1.5, 0.0])}


def test_the_first_round_fraction_n_partitions_are_malicious(make_cfg):
    assert malicious_partitions(0.25, 4) == [0]
    assert malicious_partitions(0.5, 4) == [0, 1]
    assert malicious_partitions(0.0, 4) == []
    cfg = make_cfg("attack.fraction=0.25")
    assert is_malicious(cfg, {"partition-id": 0, "num-partitions": 4})
    assert not is_malicious(cfg, {"partition-id": 1, "num-partitions": 4})
    assert not is_malicious(cfg, {"data-path": "/x.csv"})  # deployment nodes are never simulated attackers
    assert not is_malicious(make_cfg(), {"partition-id": 0, "num-partitions": 4})


def test_sign_flip_reverses_and_scales_the_update():
    out = attack("sign-flip", GLOBAL, LOCAL, 3.0)
    assert torch.equal(out["a"], torch.tensor([[1.0 - 3.0, 2.0 + 6.0]]))
    assert torch.equal(out["b"], torch.tensor([0.5, 0.5 - 3.0, 0.5 + 1.5]))


def test_gaussian_and_constant_attacks():
    big = {"w": torch.zeros(100, 100)}
    noisy = attack("gaussian", big, big, 2.0)["w"]
    assert noisy.std().item() == pytest.approx(2.0, rel=0.05)
    const = attack("constant", GLOBAL, LOCAL, 7.0)
    assert torch.equal(const["b"], GLOBAL["b"] + 7.0) and torch.equal(const["a"], GLOBAL["a"] + 7.0)


def test_malformed_attacks_are_malformed():
    nan = attack("non-finite", GLOBAL, LOCAL, 1.0)
    assert all(torch.isnan(v).any() and torch.isinf(v).any() for v in nan.values())
    assert not torch.isnan(LOCAL["a"]).any()  # the honest tensors are untouched
    shape = attack("wrong-shape", GLOBAL, LOCAL, 1.0)
    assert shape["a"].shape != LOCAL["a"].shape and shape["b"].shape == LOCAL["b"].shape


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind, reason", [("non-finite", "NaN or Inf"), ("wrong-shape", "shape")])
def test_real_attacking_client_is_rejected_by_the_server(tmp_path, tiny_models, kind, reason):
    overrides = (f"+preset=tiny train.batch_size=16 train.epochs=0.001 privacy=none attack.fraction=0.5 "
                 f"attack.kind={kind} strategy.min_train_clients=1 {tiny_models.classifier[0]}")
    cfg = load_config({"overrides": overrides, "output-dir": ""})
    contexts = {
        1000 + i: Context(run_id=7, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": 2},
                          state=RecordDict(), run_config={"overrides": overrides, "output-dir": ""})
        for i in range(2)
    }
    grid = InProcessGrid({n: (lambda msg, c=c: client_app(msg, c)) for n, c in contexts.items()})
    report = RunReport(tmp_path, to_plain(cfg))
    run_strategy(build_strategy(cfg, report), grid, trainable_state(cached_model(cfg)))
    entry = report.rounds[0]
    assert set(entry["clients"]) == {"client-1"}
    assert list(entry["failures"]) == ["client-0"] and reason in entry["failures"]["client-0"]
