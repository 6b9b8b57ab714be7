"""Stop the server mid-run and resume: same rounds, same adapter, same epsilons, nothing twice.

Whole federations in one process (the real ServerApp and ClientApp; experiments/inprocess.py).
A "stop" is the grid raising in round 2 after the clients trained and recorded the round
(the worst moment: their ledgers already hold round 2, the server's checkpoint does not).
The resumed run is a new run: new client contexts, the clients' ledgers only on disk.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch

from fed_dp_lora import checkpoint
from fed_dp_lora.config import ConfigError
from fed_dp_lora.experiments.inprocess import InProcessGrid, run_federation

# seeded_noise: two separate runs (the uninterrupted one and the stopped one) draw the same noise.
RECORD_DP = "+preset=tiny rounds=2 train.batch_size=16 train.epochs=0.05 privacy.epsilon=4 privacy.seeded_noise=true"
# Default secret noise on the clients (keys in their state dirs, outside output-dir) and DP-FedAvg on
# the server.
USER_DP = ("+preset=tiny rounds=3 privacy.noise_multiplier=1.0 train.batch_size=16 train.epochs=0.05 strategy=dp-fedavg "
           "strategy.noise_multiplier=0.3 strategy.adaptive=true strategy.clip_norm=0.05 "
           "strategy.clipped_count_stddev=1.0")


class ServerStopped(RuntimeError):
    pass


class StoppingGrid(InProcessGrid):
    """Dies in round `stop_round`: after the clients replied, or before anything was sent."""

    def __init__(self, handlers, stop_round: int, after_training: bool) -> None:
        super().__init__(handlers)
        self.stop_round, self.after_training, self.rounds = stop_round, after_training, 0

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += 1
        if self.rounds == self.stop_round and not self.after_training:
            raise ServerStopped("before round")
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.rounds == self.stop_round:
            raise ServerStopped("after the clients trained")
        return replies


def stopped_run(overrides: str, clients: int, out, stop_round: int, after_training: bool) -> None:
    grid = functools.partial(StoppingGrid, stop_round=stop_round, after_training=after_training)
    with pytest.raises(ServerStopped):
        run_federation(overrides, clients, out, grid_class=grid)


@pytest.mark.slow
def test_resume_after_a_stop_mid_round_equals_the_uninterrupted_run(tmp_path):
    whole = run_federation(RECORD_DP, 3, tmp_path / "whole")

    stopped_run(RECORD_DP, 3, tmp_path / "stopped", stop_round=2, after_training=True)
    assert checkpoint.load(tmp_path / "stopped").completed_round == 1
    resumed = run_federation(RECORD_DP, 3, tmp_path / "stopped", resume=True)

    assert [r["round"] for r in resumed["rounds"]] == [1, 2]  # no round twice
    assert resumed["run"]["resumed_after_round"] == [1]
    assert resumed["run"]["study"] == checkpoint.load(tmp_path / "stopped").study != whole["run"]["study"]
    # The clients had recorded round 2 before the stop: they resend it, and it is not re-counted.
    assert all(m.get("replayed") == 1.0 for m in resumed["rounds"][1]["clients"].values())
    assert "seed" in resumed["privacy"]["noise_source"]
    assert resumed["privacy"]["epsilon"].keys() == whole["privacy"]["epsilon"].keys()
    for client, eps in whole["privacy"]["epsilon"].items():
        assert resumed["privacy"]["epsilon"][client] == pytest.approx(eps, rel=1e-12), client
        assert resumed["privacy"]["steps"][client] == whole["privacy"]["steps"][client]
    a, b = checkpoint.load(tmp_path / "whole").adapter, checkpoint.load(tmp_path / "stopped").adapter
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed["final"]["balanced_accuracy"] == pytest.approx(whole["final"]["balanced_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_resumed_strategy_state_continues_its_own_streams(tmp_path, monkeypatch):
    """DP-FedAvg with adaptive clipping: clip norm, user-level ledger and noise RNG continue;
    the clients' secret keys continue their streams too (they live in the clients' state dirs).
    The server's outputs and the clients' state dirs are copied, and both copies resumed."""
    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path / "clients-b"))
    stopped_run(USER_DP, 3, tmp_path / "b", stop_round=2, after_training=False)
    saved = checkpoint.load(tmp_path / "b").strategy["dp"]
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.copytree(tmp_path / "clients-b", tmp_path / "clients-c")
    b = run_federation(USER_DP, 3, tmp_path / "b", resume=True)
    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path / "clients-c"))
    c = run_federation(USER_DP, 3, tmp_path / "c", resume=True)

    user = b["privacy"]["user_level"]
    assert user["rounds"] == 3 and len(user["clip_norm"]) == 3  # one user-level step per round
    assert user["clip_norm"][:2] == [saved["clip_history"][0], saved["clip_norm"]]
    assert user["noise_multiplier"] == saved["noise_multiplier"] and user["population"] == saved["population"]
    # Two resumptions from one checkpoint draw the same server noise: the RNG state was restored.
    ab, ac = checkpoint.load(tmp_path / "b").adapter, checkpoint.load(tmp_path / "c").adapter
    assert all(torch.equal(ab[k], ac[k]) for k in ab)
    assert user["epsilon"] == c["privacy"]["user_level"]["epsilon"]
    assert b["privacy"]["epsilon"] == c["privacy"]["epsilon"] and "secret key" in b["privacy"]["noise_source"]
    assert len(b["rounds"]) == 3 and b["run"]["resumed_after_round"] == [1]


@pytest.mark.slow
def test_a_stop_between_the_checkpoint_and_the_round_outputs_replays_no_server_noise(tmp_path, monkeypatch):
    """DP-FedAvg's noise RNG and ledger are saved before any artefact of the round: a stop in
    between resumes at the next round (no noise drawn twice) and writes the missing outputs."""
    from fed_dp_lora.central import CentralEvaluator

    real = CentralEvaluator.save_adapter
    calls = []

    def dies_once(self, state, folder):
        calls.append(folder.name)
        if len(calls) == 1:
            raise ServerStopped("between the checkpoint and the adapter folder")
        return real(self, state, folder)

    monkeypatch.setattr(CentralEvaluator, "save_adapter", dies_once)
    with pytest.raises(ServerStopped):
        run_federation(USER_DP.replace("rounds=3", "rounds=2"), 3, tmp_path)
    saved = checkpoint.load(tmp_path)
    assert saved.completed_round == 1 and not (tmp_path / "adapters" / "round-1").exists()
    resumed = run_federation(USER_DP.replace("rounds=3", "rounds=2"), 3, tmp_path, resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["privacy"]["user_level"]["rounds"] == 2
    assert (tmp_path / "adapters" / "round-1").is_dir() and (tmp_path / "adapters" / "round-2").is_dir()
    assert calls[:2] == ["round-1", "round-1"]  # the missing round-1 outputs, written on resume


def test_outputs_are_never_mixed_up(tmp_path):
    config = {"rounds": 2, "privacy": {"epsilon": 4.0}, "resume": False}
    with pytest.raises(ConfigError, match="nothing to resume"):
        checkpoint.resume_point(tmp_path, config, resume=True)
    assert checkpoint.resume_point(tmp_path, config, resume=False) is None
    checkpoint.save(tmp_path, checkpoint.Checkpoint("s", 1, config, {"w": torch.ones(2)}, {}, {}, None))
    with pytest.raises(ConfigError, match="already holds a run .1 of 2 rounds done.*resume=true"):
        checkpoint.resume_point(tmp_path, config, resume=False)
    with pytest.raises(ConfigError, match=r"privacy.epsilon: 4.0 -> 8.0"):
        checkpoint.resume_point(tmp_path, {**config, "privacy": {"epsilon": 8.0}}, resume=True)
    assert checkpoint.resume_point(tmp_path, {**config, "resume": True}, resume=True).completed_round == 1
    (tmp_path / checkpoint.FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.resume_point(tmp_path, config, resume=True)
