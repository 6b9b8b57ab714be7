"""One end-to-end simulation on the real Flower runtime (SuperLink + SuperExec + Ray).

A private `flower-superlink --simulation` (own FLWR_HOME, free ports, new session) runs the
app from this repository with 3 simulated SuperNodes and tiny settings for 2 rounds, once with
the default recipe (the DP linear probe) and once with recipe=lora; the SuperLink is stopped by
PID right after each run. The checks are on what the run produced
(summary.json, adapter folders, the streamed log), never on exit codes alone: a ClientApp
exception only becomes an error reply, and `flwr run` exits 0 even when nothing trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.e2e.runtime import flwr_run, start_superlink

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2
NODES = 3
# The tiny preset selects recipe=lora; the default recipe is selected back explicitly.
RECIPES = {"linear-probe": f"+preset=tiny recipe=linear-probe rounds={ROUNDS}",
           "lora": f"+preset=tiny rounds={ROUNDS}"}
# What each recipe's adapter folder holds: the probe's head, or a PEFT adapter.
ADAPTER_FILES = {"linear-probe": ("probe_head.safetensors", "probe_config.json"),
                 "lora": ("adapter_model.safetensors", "adapter_config.json")}


@pytest.fixture(scope="module", params=list(RECIPES))
def simulation(request, tmp_path_factory):
    recipe = request.param
    overrides = RECIPES[recipe]
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs") / "run"
    link = start_superlink(home)
    try:
        proc = flwr_run(
            link,
            REPO,  # the app path: the FAB is built from the repository (minus .gitignore'd)
            f"num-supernodes={NODES} client-resources-num-cpus=1",
            [f'output-dir="{out}"', f'overrides="{overrides}"'],
        )
    finally:
        link.stop()
    leftovers = link.descendants()
    run = SimpleNamespace(out=out, log=proc.stdout, returncode=proc.returncode, link=link,
                          leftovers=leftovers, recipe=recipe, overrides=overrides)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        pytest.fail(
            f"no summary.json after `flwr run` (exit {proc.returncode}).\n--- flwr run ---\n"
            f"{proc.stdout[-4000:]}\n--- superlink ---\n{link.log()[-3000:]}"
        )
    run.summary = json.loads(summary_path.read_text())
    return run


def test_superlink_was_stopped_with_everything_it_started(simulation):
    assert simulation.link.process.poll() is not None, "SuperLink still running"
    assert simulation.leftovers == [], f"processes left behind: {simulation.leftovers}"


def test_streamed_log_shows_every_round(simulation):
    log = simulation.log
    assert simulation.returncode == 0, log[-3000:]
    for r in range(1, ROUNDS + 1):
        line = next((ln for ln in log.splitlines() if f"[round {r}/{ROUNDS}]" in ln), None)
        assert line is not None, f"no progress line for round {r} in the streamed log:\n{log[-3000:]}"
        assert f"clients={NODES}" in line and "failed=" not in line, line
    assert "did not train" not in log and "rejected update" not in log


def test_summary_rounds_privacy_and_communication(simulation):
    s = simulation.summary
    assert set(s) >= {"config", "rounds", "final", "privacy", "communication"}
    cfg = s["config"]
    assert cfg["rounds"] == ROUNDS and cfg["model"]["keep_layers"] == 2  # the tiny preset
    assert cfg["train"]["method"] == simulation.recipe
    assert cfg["output_dir"] == str(simulation.out)

    rounds = s["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    names = {f"client-{i}" for i in range(NODES)}
    for r in rounds:
        assert set(r["clients"]) == names, r["clients"].keys()
        assert r["failures"] == {}
        assert r["bytes"]["up"] > 0 and r["bytes"]["down"] > 0
        # Every client returns an adapter of exactly the shape it was sent.
        assert r["bytes"]["up"] == r["bytes"]["down"]
        assert set(r["metrics"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
        assert sum(c["num-examples"] for c in r["clients"].values()) > 0

    privacy = s["privacy"]
    budget = privacy["budget"]
    assert privacy["enabled"] is True and budget == cfg["privacy"]["epsilon"] == 8.0
    assert set(privacy["epsilon"]) == names
    for name in names:
        eps = [r["epsilon"][name] for r in rounds]
        assert all(isinstance(e, float) and math.isfinite(e) for e in eps), eps
        # The ledger in context.state survives between rounds in the real runtime:
        # epsilon composes (grows) and stays within the budget it was calibrated for.
        assert 0 < eps[0] < eps[1] <= budget * (1 + 1e-9), (name, eps)
        assert privacy["epsilon"][name] == eps[-1]
        per_round = [r["clients"][name]["steps"] for r in rounds]
        # The ledger's total also counts the linear probe's feature mean: one Gaussian release,
        # charged once per study (probe.center=true under DP), beside the DP-SGD steps.
        mean_release = 1 if simulation.recipe == "linear-probe" else 0
        assert privacy["steps"][name] == sum(per_round) + mean_release

    comm = s["communication"]
    assert [p["round"] for p in comm["per_round"]] == list(range(1, ROUNDS + 1))
    assert all(p["up"] > 0 and p["down"] > 0 for p in comm["per_round"])
    assert comm["up"] == sum(p["up"] for p in comm["per_round"])
    assert comm["down"] == sum(p["down"] for p in comm["per_round"])

    for r in range(1, ROUNDS + 1):
        folder = simulation.out / "adapters" / f"round-{r}"
        for name in ADAPTER_FILES[simulation.recipe]:
            assert (folder / name).is_file(), list(folder.glob("*"))


def test_saved_adapters_reproduce_the_reported_metrics(simulation):
    """The saved adapters/round-N evaluate to what the run reported: a PEFT folder through
    PeftModel.from_pretrained(base, folder), the probe's head through the server's evaluator."""
    from fed_dp_lora.config import load_config, to_plain

    cfg = load_config({"overrides": simulation.overrides, "output-dir": str(simulation.out)})
    assert to_plain(cfg) == simulation.summary["config"]  # the same configuration as the run
    reported = {r["round"]: r["metrics"] for r in simulation.summary["rounds"]}
    reported["final"] = {k: v for k, v in simulation.summary["final"].items() if k != "majority_baseline"}
    assert reported["final"] == reported[ROUNDS]
    evaluate = _probe_evaluator(cfg) if simulation.recipe == "linear-probe" else _peft_evaluator(cfg)
    for r in (1, ROUNDS):
        got = evaluate(simulation.out / "adapters" / f"round-{r}")
        want = reported["final"] if r == ROUNDS else reported[r]
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (r, key, got, want)


def _peft_evaluator(cfg):
    import torch
    from peft import PeftModel

    from fed_dp_lora.central import central_test_table, eval_batch_size
    from fed_dp_lora.models import ModelSpec, load_base, load_tokenizer
    from fed_dp_lora.training import encode, evaluate

    test = encode(central_test_table(cfg), load_tokenizer(cfg), cfg)

    def run(folder):
        model = PeftModel.from_pretrained(load_base(ModelSpec.of(cfg, 2)), folder)
        return evaluate(model, test, eval_batch_size(cfg.eval.batch_size, torch.device("cpu")))

    return run


def _probe_evaluator(cfg):
    from safetensors.torch import load_file

    from fed_dp_lora.central import CentralEvaluator

    central = CentralEvaluator(cfg)

    def run(folder):
        head = load_file(str(folder / "probe_head.safetensors"))
        return central.evaluate({f"classifier.{k}": v for k, v in head.items()})

    return run
