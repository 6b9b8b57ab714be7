"""The release audit in whole federations (the real ServerApp and ClientApps, in one process).

Settings: fed_dp_lora/experiments/audit_power.py (RELEASE_SETTINGS), the same as the
release-audit table in docs/results.md. Noise is seeded, so every run here is one fixed draw
of the audit.
"""

from __future__ import annotations

import pytest
import torch

from fed_dp_lora.client_round import RoundRequest, train_round
from fed_dp_lora.experiments.audit_power import planted_leak, release_audit_run
from fed_dp_lora.experiments.inprocess import run_federation
from fed_dp_lora.privacy.engine import PrivateGradientEngine
from tests.client_helpers import initial_adapter
from tests.test_checkpoint import RECORD_DP, stopped_run


@pytest.mark.slow  # a federation trained to audit power: minutes
def test_without_dp_the_audit_reaches_its_ceiling(tmp_path):
    result = release_audit_run("privacy=none", tmp_path)
    assert (result["client"], result["canaries"], result["guesses"]) == ("client-0", 1000, 200)
    assert result["claimed_epsilon"] is None and result["delta"] == 0.0
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    # Measured: every guess right after round 2 with each of four seeds tried: the ceiling (4.19).
    assert result["epsilon_lower"] >= 3.0, result
    assert result["epsilon_lower"] >= result["ceiling"] - 0.5, result


@pytest.mark.slow  # a federation trained to audit power: minutes
def test_with_dp_the_bound_stays_below_the_claim_in_every_round(tmp_path):
    result = release_audit_run("privacy.epsilon=2", tmp_path)
    assert 1.9 < result["claimed_epsilon"] <= 2.0 and result["delta"] == 1e-5
    assert len(result["rounds"]) == 2
    for entry in result["rounds"]:
        assert entry["epsilon_lower"] <= entry["claimed_epsilon"], entry


@pytest.mark.slow  # a federation trained to audit power: minutes
def test_a_client_that_claims_epsilon_but_adds_no_noise_is_caught(tmp_path):
    """A "DP" flag that does nothing: the ledger counts the calibrated sigma, the steps add none.

    With int8 uploads, so the auditor reads what the strategy decoded, as it must.
    """
    finalize = PrivateGradientEngine.finalize
    with planted_leak():
        result = release_audit_run("privacy.epsilon=2 upload.compression=int8", tmp_path)
    assert PrivateGradientEngine.finalize is finalize  # the bug is gone again
    assert 1.9 < result["claimed_epsilon"] <= 2.0
    assert result["epsilon_lower"] > result["claimed_epsilon"], result


@pytest.mark.slow  # a federation in process
def test_canaries_change_the_audited_clients_release_and_no_other(make_cfg):
    settings = ("data.test_fraction=0.9", "train.batch_size=16", "train.epochs=0.5", "privacy.seeded_noise=true")
    audited = make_cfg(*settings, "audit.release.enabled=true", "audit.release.client=0",
                       "audit.release.canaries=500", "audit.release.guesses=100")
    plain = make_cfg(*settings)
    start = initial_adapter(plain)

    def release(cfg, partition: int) -> dict[str, torch.Tensor]:
        node = {"partition-id": partition, "num-partitions": 2}
        # No study: nothing persisted, so every call trains afresh from the seeded streams.
        return train_round(cfg, node, RoundRequest(start, server_round=1), None).state

    other, other_unaudited = release(audited, 1), release(plain, 1)
    assert all(torch.equal(value, other_unaudited[name]) for name, value in other.items())
    audited_release, unaudited = release(audited, 0), release(plain, 0)
    assert any(not torch.equal(value, unaudited[name]) for name, value in audited_release.items())


@pytest.mark.slow  # a federation trained to audit power: minutes
def test_a_resumed_run_continues_the_audit_from_its_checkpoint(tmp_path):
    overrides = f"{RECORD_DP} audit.release.enabled=true audit.release.canaries=300 audit.release.guesses=60"
    whole = run_federation(overrides, 2, tmp_path / "whole")["privacy"]["audit"]["release"]
    stopped_run(overrides, 2, tmp_path / "stopped", stop_round=2, after_training=True)
    resumed = run_federation(overrides, 2, tmp_path / "stopped", resume=True)["privacy"]["audit"]["release"]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed == whole
