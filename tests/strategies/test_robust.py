"""Krum, Multi-Krum, trimmed mean and median on adapters, in process with hand-built replies.

Values are constructed so the right answer is known by hand; the tests also pin down what is
aggregated robustly (the factors A and B, never the product BA) and why that is meaningful
with lora=ffa.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.models import build_model, load_trainable_state, trainable_state
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from tests.strategies.helpers import LogRecords, filled, reply_with, run_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"
REFERENCE = {A: torch.zeros(2, 4), B: torch.zeros(4, 2), "head": torch.zeros(3)}


def strategy_for(tmp_path, make_cfg, *overrides):
    cfg = make_cfg(*overrides)
    report = RunReport(tmp_path, to_plain(cfg))
    return build_strategy(cfg), report


def test_krum_selects_the_update_closest_to_its_neighbours(tmp_path, make_cfg):
    # Scores with f=1, n=5 (sum of squared distances to the n-f-2 = 2 nearest, per coordinate):
    # 1.00: 0.05^2+0.1^2 = .0125 | 1.05: 2*0.05^2 = .005 | 1.10: .0125 | 0.90: .0325 | 50: huge.
    values = {401: 1.0, 402: 1.05, 403: 1.1, 404: 0.9, 405: 50.0}
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, v), 10 * i + 10) for i, (n, v) in enumerate(values.items())})
    strategy, report = strategy_for(tmp_path, make_cfg, "strategy=krum", "strategy.num_malicious=1")
    result = run_strategy(strategy, grid, REFERENCE, report)

    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.equal(value, torch.full_like(value, 1.05)), key  # exactly node 402's adapter
    assert report.rounds[0]["strategy"]["selected"] == ["node-402"]


def test_multi_krum_default_averages_the_n_minus_f_best(tmp_path, make_cfg):
    values = {401: 1.0, 402: 1.05, 403: 1.1, 404: 0.9, 405: 50.0}
    weights = {401: 10, 402: 20, 403: 30, 404: 40, 405: 1000}
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, v), weights[n]) for n, v in values.items()})
    strategy, report = strategy_for(tmp_path, make_cfg, "strategy=multi-krum", "strategy.num_malicious=1")
    result = run_strategy(strategy, grid, REFERENCE, report)

    expected = (10 * 1.0 + 20 * 1.05 + 30 * 1.1 + 40 * 0.9) / 100  # the attacker's weight is gone
    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.allclose(value, torch.full_like(value, expected)), key
    assert report.rounds[0]["strategy"]["selected"] == ["node-401", "node-402", "node-403", "node-404"]


def _per_coordinate(columns: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    """Client i's adapter holds columns[c][i] in coordinate c of every tensor (cycled)."""
    clients = []
    for i in range(len(columns[0])):
        state = {}
        for key, ref in REFERENCE.items():
            flat = torch.tensor([columns[c % len(columns)][i] for c in range(ref.numel())])
            state[key] = flat.reshape(ref.shape)
        clients.append(state)
    return clients


COLUMNS = [[1.0, 2.0, 3.0, 4.0, 100.0], [100.0, -50.0, 0.0, 1.0, 2.0], [5.0, 5.0, -9.0, 5.0, 7.0]]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        # beta=0.25 with 5 clients cuts int(1.25)=1 value from each tail of every coordinate
        ("trimmed-mean", [(2 + 3 + 4) / 3, (0 + 1 + 2) / 3, (5 + 5 + 5) / 3]),
        ("median", [3.0, 1.0, 5.0]),
    ],
)
def test_coordinate_wise_statistics(tmp_path, make_cfg, strategy, expected):
    clients = _per_coordinate(COLUMNS)
    # Very unequal record counts: these statistics are unweighted, so they must not matter.
    grid = InProcessGrid({500 + i: reply_with(c, 10 ** i) for i, c in enumerate(clients)})
    strat, _ = strategy_for(tmp_path, make_cfg, f"strategy={strategy}")
    result = run_strategy(strat, grid, REFERENCE).arrays.to_torch_state_dict()
    for key, ref in REFERENCE.items():
        want = torch.tensor([expected[c % 3] for c in range(ref.numel())]).reshape(ref.shape)
        assert torch.allclose(result[key], want), (key, result[key], want)


STRATEGIES = ["fedavg", "dp-fedavg", "krum", "multi-krum", "trimmed-mean", "median"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_rejects_malformed_updates_and_goes_on(tmp_path, make_cfg, name):
    nan = filled(REFERENCE, 1.0)
    nan[B][0, 0] = float("nan")
    inf = filled(REFERENCE, 1.0)
    inf["head"][1] = float("inf")
    wrong_key = {**{k: v for k, v in filled(REFERENCE, 1.0).items() if k != "head"}, "heads": torch.ones(3)}
    wrong_shape = {**filled(REFERENCE, 1.0), A: torch.ones(4, 2)}
    absurd = filled(REFERENCE, 1e6)  # norm ~4.6e6 > 1e6
    honest = {601: 1.0, 602: 1.1, 603: 0.9, 604: 1.05, 605: 0.95}
    nodes = {n: reply_with(filled(REFERENCE, v), 10) for n, v in honest.items()}
    bad = {606: nan, 607: inf, 608: wrong_key, 609: wrong_shape, 610: absurd}
    nodes.update({n: reply_with(s, 10) for n, s in bad.items()})
    extra = ["strategy.noise_multiplier=1e-9", "strategy.clip_norm=100"] if name == "dp-fedavg" else []
    strat, report = strategy_for(tmp_path, make_cfg, f"strategy={name}", *extra)
    with LogRecords() as logs:
        result = run_strategy(strat, InProcessGrid(nodes), REFERENCE, report)

    entry = report.rounds[0]
    assert set(entry["failures"]) == {f"node-{n}" for n in bad}
    assert all(f.startswith("rejected:") for f in entry["failures"].values())
    assert "NaN or Inf" in entry["failures"]["node-606"] and "NaN or Inf" in entry["failures"]["node-607"]
    assert "heads" in entry["failures"]["node-608"] and "shape" in entry["failures"]["node-609"]
    assert "norm" in entry["failures"]["node-610"]
    assert set(entry["clients"]) == {f"node-{n}" for n in honest}
    for node in bad:
        assert any(f"(node {node})" in m and "rejected" in m for m in logs.warnings()), node
    # The round went on: a finite adapter within the honest values (for every aggregator);
    # DP-FedAvg divides the honest sum by its fixed denominator (10 sampled), rejected count zero.
    low, high = (0.5, 0.5) if name == "dp-fedavg" else (0.9, 1.1)
    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.all(torch.isfinite(value)), key
        assert value.min() >= low - 1e-6 and value.max() <= high + 1e-6, (key, value)


# --- what is aggregated robustly ------------------------------------------------------------


def test_vanilla_statistics_act_on_the_factors_not_on_the_product(tmp_path, make_cfg):
    """Documents the decision: median(B) @ median(A) is the result, and it is not median(B A)."""
    rng = np.random.default_rng(0)
    clients = [{A: torch.tensor(rng.normal(size=(2, 4)), dtype=torch.float32),
                B: torch.tensor(rng.normal(size=(4, 2)), dtype=torch.float32),
                "head": torch.zeros(3)} for _ in range(5)]
    grid = InProcessGrid({700 + i: reply_with(c) for i, c in enumerate(clients)})
    strat, _ = strategy_for(tmp_path, make_cfg, "strategy=median")
    got = run_strategy(strat, grid, REFERENCE).arrays.to_torch_state_dict()

    med_a = torch.median(torch.stack([c[A] for c in clients]), dim=0).values
    med_b = torch.median(torch.stack([c[B] for c in clients]), dim=0).values
    assert torch.equal(got[A], med_a) and torch.equal(got[B], med_b)
    median_of_products = torch.median(torch.stack([c[B] @ c[A] for c in clients]), dim=0).values
    assert not torch.allclose(got[B] @ got[A], median_of_products, atol=1e-3)


def test_krum_keeps_one_clients_product_exactly(tmp_path, make_cfg):
    rng = np.random.default_rng(1)
    base_a, base_b = rng.normal(size=(2, 4)), rng.normal(size=(4, 2))
    clients = [{A: torch.tensor(base_a + 0.01 * rng.normal(size=(2, 4)), dtype=torch.float32),
                B: torch.tensor(base_b + 0.01 * rng.normal(size=(4, 2)), dtype=torch.float32),
                "head": torch.zeros(3)} for _ in range(4)]
    clients.append({A: torch.full((2, 4), 30.0), B: torch.full((4, 2), -30.0), "head": torch.zeros(3)})
    grid = InProcessGrid({800 + i: reply_with(c) for i, c in enumerate(clients)})
    strat, report = strategy_for(tmp_path, make_cfg, "strategy=krum")
    got = run_strategy(strat, grid, REFERENCE, report).arrays.to_torch_state_dict()
    chosen = int(report.rounds[0]["strategy"]["selected"][0].split("-")[1]) - 800
    assert chosen != 4
    assert torch.equal(got[B] @ got[A], clients[chosen][B] @ clients[chosen][A])


def test_ffa_robust_statistics_of_b_give_the_update_of_that_statistic(tmp_path, tiny_models):
    """With A frozen and shared, Delta W = s B A is linear in B: median over B is meaningful."""
    overrides = f"+preset=tiny lora=ffa strategy=median {tiny_models.classifier[0]}"
    cfg = load_config({"overrides": overrides, "output-dir": ""})
    model = build_model(cfg, 2)
    initial = trainable_state(model)
    assert not any("lora_A" in k for k in initial)
    rng = np.random.default_rng(2)
    clients = [{k: v + torch.tensor(rng.normal(scale=0.01, size=tuple(v.shape)), dtype=torch.float32)
                for k, v in initial.items()} for _ in range(4)]
    clients.append({k: v + 5.0 for k, v in initial.items()})  # an attacker
    grid = InProcessGrid({900 + i: reply_with(c) for i, c in enumerate(clients)})
    strat = build_strategy(cfg)
    got = run_strategy(strat, grid, initial).arrays.to_torch_state_dict()
    load_trainable_state(model, got)

    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(layers) >= 2
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.detach()
        b_key = next(k for k in got if k.startswith(name + ".") and "lora_B" in k)
        med_b = torch.median(torch.stack([c[b_key] for c in clients]), dim=0).values
        assert torch.equal(got[b_key], med_b)
        delta = layer.get_delta_weight("default")
        assert torch.allclose(delta, layer.scaling["default"] * med_b @ a, atol=1e-6)
        # and the attacker's B moved nothing beyond the honest range, coordinate by coordinate
        honest = torch.stack([c[b_key] for c in clients[:4]])
        assert torch.all(got[b_key] <= honest.max(0).values) and torch.all(got[b_key] >= honest.min(0).values)
