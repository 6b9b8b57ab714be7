"""SecAgg+ in process: Flower's SecAggPlusWorkflow on the server, secaggplus_mod on clients.

The clients are small ClientApps that use the real client wiring (secagg_when_asked mod, the
wire helpers that read the legacy instructions and clip and encode the update) around known
updates, so the unmasked result can be compared with the plain sum of the clipped updates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.run import Run

from fed_dp_lora.client_app import secagg_when_asked
from fed_dp_lora.config import to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.privacy.user_level import clip_update
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies.factory import user_level_dp
from fed_dp_lora.strategies.secagg import masked_upload_bytes, run_secagg
from fed_dp_lora.wire import secagg_fitins, secagg_fitres

pytestmark = pytest.mark.usefixtures("task_identity")

INITIAL = {"layer.lora_A": torch.full((2, 4), 0.1), "layer.lora_B": torch.zeros(4, 2), "head": torch.zeros(3)}
RNG = np.random.default_rng(3)
# Known updates: two larger than C=1 (clipped), two smaller (kept).
UPDATES = [{k: torch.tensor(RNG.normal(scale=s, size=tuple(v.shape)), dtype=torch.float32) for k, v in INITIAL.items()}
           for s in (0.5, 0.02, 0.6, 0.03)]
NUM_EXAMPLES = [10, 30, 20, 40]
STEP = 2 * 8.0 / 2 ** 22  # SecAgg+ quantization step with clipping_range 8


def fake_client(i: int) -> ClientApp:
    """A client whose local training yields the update UPDATES[i]."""
    app = ClientApp()

    @app.train(mods=[secagg_when_asked])
    def train(msg: Message, context: Context) -> Message:
        global_state, config = secagg_fitins(msg.content)
        local = {k: global_state[k] + UPDATES[i][k] for k in global_state}
        metrics = {"num-examples": NUM_EXAMPLES[i], "train-loss": 0.5, "partition-id": i}
        return Message(secagg_fitres(global_state, local, config, NUM_EXAMPLES[i], metrics), reply_to=msg)

    return app


def secagg_grid(drop: int | None = None) -> InProcessGrid:
    contexts = {n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in range(1, 5)}
    apps = {n: fake_client(n - 1) for n in contexts}

    def node(n: int):
        def handle(msg: Message) -> Message:
            stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
            if n - 1 == drop and stage == Stage.COLLECT_MASKED_VECTORS:
                # After sharing its keys, the node is gone: the runtime answers with an error.
                return Message(Error(code=0, reason="node offline"), reply_to=msg)
            return apps[n](msg, contexts[n])
        return handle

    grid = InProcessGrid({n: node(n) for n in contexts})
    grid.set_run(Run.create_empty(run_id=7))
    return grid


def run(tmp_path, make_cfg, grid, *overrides, rounds: int = 1):
    cfg = make_cfg("secagg=true", f"rounds={rounds}", *overrides)
    report = RunReport(tmp_path, to_plain(cfg))
    states: dict[int, dict[str, torch.Tensor]] = {}

    def evaluate_state(server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        states[server_round] = state
        return {"loss": 0.0}

    dp = user_level_dp(cfg) if cfg.strategy.name == "dp-fedavg" else None
    run_secagg(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}),
               cfg, INITIAL, evaluate_state, report.record_round, dp, "study")
    return report, states


def clipped_sum(indices: list[int], clip: float) -> dict[str, np.ndarray]:
    total = {k: np.zeros(v.shape) for k, v in INITIAL.items()}
    for i in indices:
        clipped, _ = clip_update({k: v.double().numpy() for k, v in UPDATES[i].items()}, clip)
        for k in total:
            total[k] += clipped[k]
    return total


@pytest.mark.slow  # Flower's SecAgg+ protocol end to end in process
def test_dp_unmasked_sum_equals_the_plain_sum_of_clipped_updates(tmp_path, make_cfg):
    grid = secagg_grid()
    report, states = run(tmp_path, make_cfg, grid, "strategy=dp-fedavg", "strategy.clip_norm=1.0",
                         "strategy.noise_multiplier=1e-9")
    norms = [math.sqrt(sum(float((v.double() ** 2).sum()) for v in u.values())) for u in UPDATES]
    assert norms[0] > 1 and norms[2] > 1 and norms[1] < 1 and norms[3] < 1  # the example clips two
    want = clipped_sum([0, 1, 2, 3], 1.0)
    for k, v in states[1].items():
        got_sum = (v.double().numpy() - INITIAL[k].double().numpy()) * 4  # denominator: 4 sampled
        assert np.allclose(got_sum, want[k], atol=4 * STEP), k  # up to quantization (1 step per client)
    # The server never held an individual update: every stage-2 reply had its arrays removed.
    masked = [r for r in grid.replies if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 4
    assert all(len(rec) == 0 for r in masked for rec in r.content.array_records.values())
    # Bytes up: what the masked vectors actually took.
    actual = sum(sum(len(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
                 for r in masked)
    shapes = [tuple(v.shape) for v in INITIAL.values()]
    assert report.rounds[0]["bytes"]["up"] == actual == 4 * masked_upload_bytes(shapes)
    assert set(report.rounds[0]["clients"]) == {"client-0", "client-1", "client-2", "client-3"}
    assert report.summary()["privacy"]["user_level"]["enabled"] is True


@pytest.mark.slow  # Flower's SecAgg+ protocol end to end in process
def test_fedavg_under_secagg_is_the_weighted_mean_of_the_updates(tmp_path, make_cfg):
    _, states = run(tmp_path, make_cfg, secagg_grid(), "secaggplus.max_weight=40")
    total = sum(NUM_EXAMPLES)
    for k, v in states[1].items():
        want = INITIAL[k].double() + sum(n * u[k].double() for n, u in zip(NUM_EXAMPLES, UPDATES)) / total
        assert torch.allclose(v.double(), want, atol=4 * STEP), k


@pytest.mark.slow  # Flower's SecAgg+ protocol end to end in process
def test_a_client_dropping_mid_round_does_not_stop_the_round(tmp_path, make_cfg):
    # 4 clients, shares with all, threshold round(0.5 * 4) = 2: one dropout is recoverable.
    report, states = run(tmp_path, make_cfg, secagg_grid(drop=2), "strategy=dp-fedavg",
                         "strategy.noise_multiplier=1e-9", rounds=2)
    want = clipped_sum([0, 1, 3], 1.0)
    for k, v in states[1].items():
        got_sum = (v.double().numpy() - INITIAL[k].double().numpy()) * 4  # the denominator stays 4
        assert np.allclose(got_sum, want[k], atol=4 * STEP), k
    for r in report.rounds:
        assert set(r["clients"]) == {"client-0", "client-1", "client-3"}
        assert list(r["failures"].values()) == ["dropped out of secure aggregation (no masked update)"]
    assert report.rounds[1]["strategy"]["aggregated"] == 3


@pytest.mark.slow  # Flower's SecAgg+ protocol end to end in process
def test_too_many_dropouts_halt_the_round_and_keep_the_adapter(tmp_path, make_cfg):
    # Threshold: all 4 shares; after one dropout only 3 neighbours are left, below it.
    report, states = run(tmp_path, make_cfg, secagg_grid(drop=1), "secaggplus.num_shares=1.0",
                         "secaggplus.reconstruction_threshold=1.0")
    assert "secure aggregation halted" in report.rounds[0]["failures"]["server"]
    for k, v in states[1].items():
        assert torch.equal(v, INITIAL[k]), k
