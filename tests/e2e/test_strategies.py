"""Every strategy class on the real Flower runtime: one private SuperLink, one `flwr run .` each.

Tiny settings (2 layers, 32 tokens, one Poisson step of ~16 records, a 5% central test set,
one round, 2 simulated SuperNodes). Checks are on what each run wrote (summary.json,
adapters, streamed log), never on exit codes alone. Every strategy choice runs here (plain
fedavg in test_simulation.py), with and without DP-FedAvg under SecAgg+.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.e2e.runtime import flwr_run, start_superlink

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NODES = 2
TINY = "+preset=tiny train.batch_size=16 train.epochs=0.001 privacy.noise_multiplier=1.0 data.test_fraction=0.05"
RUNS = {
    "dp-fedavg": "strategy=dp-fedavg strategy.noise_multiplier=1.0",
    "krum": "strategy=krum strategy.num_malicious=0",
    "multi-krum": "strategy=multi-krum strategy.num_malicious=0",
    "trimmed-mean": "strategy=trimmed-mean",
    "median": "strategy=median attack.fraction=0.5 attack.kind=non-finite",
    "secagg-dp-fedavg": "secagg=true strategy=dp-fedavg strategy.noise_multiplier=1.0",
    "secagg-fedavg": "secagg=true strategy=fedavg",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    link = start_superlink(home)
    out: dict[str, SimpleNamespace] = {}
    try:
        for name, overrides in RUNS.items():
            folder = tmp_path_factory.mktemp("outputs") / name
            proc = flwr_run(link, REPO, f"num-supernodes={NODES} client-resources-num-cpus=1",
                            [f'output-dir="{folder}"', f'overrides="{TINY} {overrides}"'])
            summary = folder / "summary.json"
            out[name] = SimpleNamespace(
                out=folder, log=proc.stdout, returncode=proc.returncode,
                summary=json.loads(summary.read_text()) if summary.is_file() else None,
            )
    finally:
        link.stop()
    assert link.descendants() == [], "processes left behind"
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_strategy_runs_end_to_end_with_the_same_outputs(runs, name):
    run = runs[name]
    assert run.summary is not None, f"no summary.json for {name}:\n{run.log[-4000:]}"
    assert run.returncode == 0, run.log[-3000:]
    s = run.summary
    assert s["config"]["strategy"]["name"] == name.removeprefix("secagg-")
    assert s["config"]["secagg"] is name.startswith("secagg-")
    (entry,) = s["rounds"]
    assert set(entry["metrics"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    assert entry["bytes"]["up"] > 0 and entry["bytes"]["down"] > 0
    assert "[round 1/1]" in run.log, run.log[-3000:]
    assert (run.out / "adapters" / "round-1" / "adapter_model.safetensors").is_file()
    assert s["privacy"]["enabled"] is True and s["privacy"]["unit"].startswith("record:")
    user = s["privacy"]["user_level"]
    assert user["enabled"] is name.endswith("dp-fedavg") and user["unit"].startswith("client:")
    if name == "median":  # round(0.5 * 2) = 1: partition 0 attacks with a non-finite update
        assert set(entry["clients"]) == {"client-1"}
        assert "NaN or Inf" in entry["failures"]["client-0"]
        assert "rejected update from client-0 (node " in run.log
    else:
        assert set(entry["clients"]) == {f"client-{i}" for i in range(NODES)}, entry
        assert entry["failures"] == {}
    if name == "krum":
        assert len(entry["strategy"]["selected"]) == 1
    if name == "multi-krum":  # m = n - f = 2 of 2
        assert entry["strategy"]["selected"] == [f"client-{i}" for i in range(NODES)]
    if name.endswith("dp-fedavg"):
        assert entry["strategy"]["aggregated"] == NODES and entry["strategy"]["denominator"] == NODES
        assert user["epsilon"] > 0 and user["rounds"] == 1
    if name.startswith("secagg-"):
        assert f"SecAgg+ aggregate of {NODES} masked updates" in run.log, run.log[-3000:]
