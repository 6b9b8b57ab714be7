"""AdapterFedAvg.start, in process: a Grid subclass delivers each message to a node handler.

Handlers are either the real ClientApp (with a per-node Context kept across rounds, as the
runtime does) or hand-built replies with known tensors, so aggregation, rejection, refusal
records and byte counts can be checked exactly.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.logger import FLOWER_LOGGER

from fed_dp_lora.client_app import LEDGER_KEY
from fed_dp_lora.client_app import app as client_app
from fed_dp_lora.client_data import cached_model
from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.models import build_model, load_trainable_state, trainable_state
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Release, StudyTerms
from fed_dp_lora.reply import REFUSAL_TEXT, Refusal
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from tests.client_helpers import initial_adapter
from tests.strategies.helpers import error_reply, filled, reply_with, run_strategy

# One Poisson step on an expected batch of 16 per round, fixed noise (no calibration).
FAST = "+preset=tiny train.batch_size=16 train.epochs=0.001 privacy.noise_multiplier=1.0"


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def flwr_log():
    """Records logged by Flower's logger (which the strategy logs through)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    FLOWER_LOGGER.addHandler(handler)
    yield records
    FLOWER_LOGGER.removeHandler(handler)


def make_report(tmp_path, cfg) -> RunReport:
    return RunReport(tmp_path, to_plain(cfg))


def npy_bytes(t: torch.Tensor) -> int:
    """Bytes of one tensor as Flower serializes it (an .npy buffer), computed independently."""
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return len(buf.getvalue())


REFERENCE = {"layer.lora_A": torch.zeros(2, 4), "layer.lora_B": torch.zeros(4, 2), "head": torch.zeros(3)}


def test_aggregation_is_weighted_by_num_examples(tmp_path, make_cfg):
    cfg = make_cfg()
    report = make_report(tmp_path, cfg)
    grid = InProcessGrid({
        101: reply_with(filled(REFERENCE, 1.0), 10, **{"partition-id": 0}),
        102: reply_with(filled(REFERENCE, 2.0), 30, **{"partition-id": 1}),
        103: reply_with(filled(REFERENCE, 3.0), 60, **{"partition-id": 2}),
    })
    result = run_strategy(build_strategy(cfg), grid, REFERENCE, report)

    assert len(grid.sent) == 3  # every node was asked (fraction_train = 1)
    got = result.arrays.to_torch_state_dict()
    assert got.keys() == REFERENCE.keys()
    for key, value in got.items():
        # (10*1 + 30*2 + 60*3) / 100 = 2.5; an unweighted mean would give 2.0
        assert torch.allclose(value, torch.full_like(value, 2.5)), (key, value)
    assert set(report.rounds[0]["clients"]) == {"client-0", "client-1", "client-2"}
    assert report.rounds[0]["clients"]["client-2"]["num-examples"] == 60
    assert report.rounds[0]["failures"] == {}


def test_ffa_averaging_b_is_exactly_the_average_of_the_updates_ba(tmp_path, tiny_models):
    overrides = f"{FAST} lora=ffa {tiny_models.classifier[0]}"
    cfg = load_config({"overrides": overrides, "output-dir": ""})
    assert cfg.lora.mode == "ffa"
    server_model = build_model(cfg, 2)  # the server's own copy, built independently
    initial = trainable_state(server_model)
    assert not any("lora_A" in k for k in initial), "FFA must not send A"
    assert any("lora_B" in k for k in initial)

    contexts = {
        200 + i: Context(run_id=7, node_id=200 + i, node_config={"partition-id": i, "num-partitions": 3},
                         state=RecordDict(), run_config={"overrides": overrides, "output-dir": ""})
        for i in range(3)
    }
    grid = InProcessGrid({n: (lambda msg, c=c: client_app(msg, c)) for n, c in contexts.items()})
    report = make_report(tmp_path, cfg)
    result = run_strategy(build_strategy(cfg), grid, initial, report)

    assert len(grid.replies) == 3 and not any(r.has_error() for r in grid.replies), [
        r.error for r in grid.replies if r.has_error()]
    assert report.rounds[0]["failures"] == {}
    clients = [r.content["arrays"].to_torch_state_dict() for r in grid.replies]
    n = torch.tensor([float(r.content["metrics"]["num-examples"]) for r in grid.replies], dtype=torch.float64)
    w = n / n.sum()
    aggregated = result.arrays.to_torch_state_dict()

    client_model = cached_model(cfg)  # the clients' model, built in their "process"
    server_layers = {name: m for name, m in server_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    client_layers = {name: m for name, m in client_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert server_layers and server_layers.keys() == client_layers.keys()

    load_trainable_state(server_model, aggregated)  # the server applies the new global adapter
    checked = 0
    for name, layer in server_layers.items():
        a = layer.lora_A["default"].weight.detach().double()
        # A is frozen and drawn from lora.init_seed: identical on the server and every client.
        assert torch.equal(a.float(), client_layers[name].lora_A["default"].weight.detach().float())
        scale = layer.scaling["default"]
        b_key = next(k for k in aggregated if k.startswith(name + ".") and "lora_B" in k)
        b_clients = [c[b_key].double() for c in clients]
        assert any(not torch.equal(b_clients[0], b) for b in b_clients[1:]), "clients sent identical B"

        b_mean = sum(wi * b for wi, b in zip(w, b_clients))
        assert torch.allclose(aggregated[b_key].double(), b_mean, rtol=1e-5, atol=1e-7)
        delta_of_mean = scale * aggregated[b_key].double() @ a          # what the global model applies
        mean_of_deltas = sum(wi * scale * (b @ a) for wi, b in zip(w, b_clients))  # mean client update
        assert torch.allclose(delta_of_mean, mean_of_deltas, rtol=1e-5, atol=1e-7), name
        checked += 1

        # The same through PEFT: the merged weight delta of the aggregated adapter.
        peft_delta = layer.get_delta_weight("default").double()
        assert torch.allclose(peft_delta, delta_of_mean, rtol=1e-5, atol=1e-7)
    assert checked == len(server_layers) >= 2


def test_malformed_updates_are_rejected_logged_and_the_round_goes_on(tmp_path, make_cfg, flwr_log):
    cfg = make_cfg()
    report = make_report(tmp_path, cfg)
    nan = filled(REFERENCE, 1.0)
    nan["layer.lora_B"][0, 0] = float("nan")
    wrong_key = {**{k: v for k, v in filled(REFERENCE, 1.0).items() if k != "head"}, "heads": torch.ones(3)}
    wrong_shape = {**filled(REFERENCE, 1.0), "layer.lora_A": torch.ones(4, 2)}
    grid = InProcessGrid({
        301: reply_with(filled(REFERENCE, 1.0), 10),
        302: reply_with(filled(REFERENCE, 3.0), 30),
        303: reply_with(nan, 1000),
        304: reply_with(wrong_key, 1000),
        305: reply_with(wrong_shape, 1000),
    })
    result = run_strategy(build_strategy(cfg), grid, REFERENCE, report)

    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.allclose(value, torch.full_like(value, 2.5)), key  # (10*1 + 30*3) / 40
    entry = report.rounds[0]
    assert set(entry["clients"]) == {"node-301", "node-302"}
    failures = entry["failures"]
    assert set(failures) == {"node-303", "node-304", "node-305"}
    assert failures["node-303"].startswith("rejected:") and "NaN" in failures["node-303"]
    assert "wrong tensors" in failures["node-304"] and "heads" in failures["node-304"]
    assert "shape" in failures["node-305"] and "layer.lora_A" in failures["node-305"]

    warnings = [r.getMessage() for r in flwr_log if r.levelno == logging.WARNING]
    for node in (303, 304, 305):
        assert any("rejected" in m and f"(node {node})" in m for m in warnings), (node, warnings)

    summary = json.loads(report.write().read_text())
    assert summary["rounds"][0]["failures"] == failures


def test_error_replies_are_recorded_with_their_reason(tmp_path, tiny_models):
    overrides = f"{FAST} {tiny_models.classifier[0]}"
    cfg = load_config({"overrides": overrides, "output-dir": ""})
    reference = initial_adapter(cfg)

    # A real client whose ledger (in its Context) has already spent far more than the budget.
    node_config = {"partition-id": 0, "num-partitions": 3}
    spent = InstitutionLedger([Release("test-study", 0, 1.0, 0.5, 5000)], {"test-study": StudyTerms(1e-4, "rdp", 1.0)})
    exhausted = Context(run_id=7, node_id=401, node_config=node_config, state=RecordDict(),
                        run_config={"overrides": overrides, "output-dir": ""})
    exhausted.state[LEDGER_KEY] = ConfigRecord(spent.to_dict())
    # A real client pointed at a data file that does not exist.
    missing = tmp_path / "gone.csv"
    no_data = Context(run_id=7, node_id=402, node_config={"data-path": str(missing), "state-dir": str(tmp_path),
                                                          "records": 100, "epsilon": 8.0, "labels": "good,bad"},
                      state=RecordDict(),
                      run_config={"overrides": overrides, "output-dir": ""})
    traceback = ("Traceback (most recent call last):\n  File \"client_app.py\", line 3\n"
                 "BudgetExceeded: privacy budget exhausted: epsilon would reach 9.100 > budget 8\n")
    grid = InProcessGrid({
        401: lambda msg: client_app(msg, exhausted),
        402: lambda msg: client_app(msg, no_data),
        403: error_reply(Refusal.BUDGET, traceback),
        404: reply_with({k: v + 1.0 for k, v in reference.items()}, 10),
        405: reply_with({k: v + 3.0 for k, v in reference.items()}, 30),
        406: node_unavailable,
    })
    report = make_report(tmp_path, cfg)
    result = run_strategy(build_strategy(cfg), grid, reference, report)

    failures = report.rounds[0]["failures"]
    assert set(failures) == {"node-401", "node-402", "node-403", "node-406"}
    # The SuperLink answers for a dead node; the failure is still the node's, not the SuperLink's.
    assert failures["node-406"].startswith("error (code 5): Node Unavailable")
    assert failures["node-401"] == f"error (code {Refusal.BUDGET}): {REFUSAL_TEXT[Refusal.BUDGET]}"
    # The institution's file problem reaches the server as a code and a fixed text, never the path.
    assert failures["node-402"] == f"error (code {Refusal.DATA}): {REFUSAL_TEXT[Refusal.DATA]}"
    # Only the message of a traceback-style reason is kept.
    assert failures["node-403"] == (
        f"error (code {Refusal.BUDGET}): BudgetExceeded: privacy budget exhausted: "
        "epsilon would reach 9.100 > budget 8"
    )
    assert dict(exhausted.state[LEDGER_KEY]) == spent.to_dict()  # the refusal spent nothing
    # The round still aggregates the two nodes that trained: reference + (10*1 + 30*3)/40.
    got = result.arrays.to_torch_state_dict()
    for key in reference:
        assert torch.allclose(got[key], reference[key] + 2.5, atol=1e-6), key
    assert set(report.rounds[0]["clients"]) == {"node-404", "node-405"}


def node_unavailable(msg: Message) -> Message:
    """What the SuperLink sends back for a node whose heartbeat stopped (sender: the SuperLink)."""
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def test_bytes_up_and_down_are_counted_per_round(tmp_path, make_cfg):
    cfg = make_cfg()
    report = make_report(tmp_path, cfg)
    nan = filled(REFERENCE, 2.0)
    nan["head"][0] = float("inf")
    grid = InProcessGrid({
        501: reply_with(filled(REFERENCE, 1.0), 10),
        502: reply_with(filled(REFERENCE, 2.0), 10),
        503: reply_with(nan, 10),  # rejected: its bytes arrive but are not counted as an update
    })
    run_strategy(build_strategy(cfg), grid, REFERENCE, report, rounds=2)

    size = sum(npy_bytes(t) for t in REFERENCE.values())
    assert size > sum(t.numel() * 4 for t in REFERENCE.values())  # payload plus .npy headers
    assert len(grid.sent) == 6
    summary = report.summary()
    for entry in summary["rounds"]:
        assert entry["bytes"] == {"down": 3 * size, "up": 2 * size}, entry["round"]
    comm = summary["communication"]
    assert comm["per_round"] == [{"round": r, "up": 2 * size, "down": 3 * size} for r in (1, 2)]
    assert comm["up"] == 4 * size and comm["down"] == 6 * size


def test_replies_with_different_metric_keys_are_still_aggregated(tmp_path, make_cfg):
    """A client resending a kept update reports one key more: the round must not fail on it."""
    cfg = make_cfg()
    report = make_report(tmp_path, cfg)
    grid = InProcessGrid({1: reply_with(filled(REFERENCE, 1.0), 10),
                          2: reply_with(filled(REFERENCE, 3.0), 30, replayed=1.0)})
    result = run_strategy(build_strategy(cfg), grid, REFERENCE, report)
    got = result.arrays.to_torch_state_dict()
    assert all(torch.allclose(got[k], REFERENCE[k] + 2.5) for k in REFERENCE)
    assert report.rounds[0]["clients"]["node-2"]["replayed"] == 1.0  # the report keeps everything
