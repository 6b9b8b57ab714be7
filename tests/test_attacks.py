"""Simulated attackers: who is malicious, what each attack sends, and that the server sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

from fed_dp_lora.attacks import _attacked_fitres, attack, is_malicious, malicious_partitions
from fed_dp_lora.client_app import app as client_app
from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.flower_internals import recorddict_compat
from fed_dp_lora.node_policy import is_simulated
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.wire import SECAGG_KEYS, secagg_fitres
from tests.client_helpers import initial_adapter
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
    run_strategy(build_strategy(cfg), grid, initial_adapter(cfg), report)
    entry = report.rounds[0]
    assert set(entry["clients"]) == {"client-1"}
    assert list(entry["failures"]) == ["client-0"] and reason in entry["failures"]["client-0"]


@pytest.mark.slow  # a fresh interpreter importing the ClientApp
def test_a_deployed_node_never_loads_the_attack_code():
    """The ClientApp imports attacks.py only for a simulated client (no data file of its own)."""
    code = ("import sys; import fed_dp_lora.client_app; "
            "assert 'fed_dp_lora.attacks' not in sys.modules, 'client_app imported the attack code'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert is_simulated({"partition-id": 0, "num-partitions": 2})
    assert not is_simulated({"data-path": "/x.csv", "partition-id": 0, "num-partitions": 2})


def test_under_secagg_the_attack_replaces_the_update_before_masking():
    """A SecAgg+ reply carries the update (local - global): sign-flip sends -scale times it."""
    keys = list(GLOBAL)
    fitins = FitIns(ndarrays_to_parameters([GLOBAL[k].numpy() for k in keys]), {SECAGG_KEYS: "\n".join(keys)})
    request = recorddict_compat.fitins_to_recorddict(fitins, keep_input=True)
    honest = secagg_fitres(GLOBAL, LOCAL, {SECAGG_KEYS: "\n".join(keys)}, 10, {"num-examples": 10.0})
    attacked = recorddict_compat.recorddict_to_fitres(_attacked_fitres(request, honest, "sign-flip", 3.0),
                                                      keep_input=True)
    for k, sent in zip(keys, parameters_to_ndarrays(attacked.parameters), strict=True):
        assert torch.allclose(torch.from_numpy(sent), -3.0 * (LOCAL[k] - GLOBAL[k]))
    assert attacked.num_examples == 10
