"""The client round's structure: an accounted update cannot exist before its ledger is written."""

from __future__ import annotations

import pytest
import torch

from fed_dp_lora.client_round import Released
from fed_dp_lora.node_policy import NodePolicy
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Release, StudyTerms
from fed_dp_lora.privacy.ledger_store import InstitutionState, LedgerError, LedgerReceipt

POLICY = NodePolicy(data_path=None, state_dir=None, partition=None)
STATE = {"classifier.weight": torch.zeros(2, 4)}
ACCOUNTED = {"num-examples": 100.0, "epsilon": 1.5, "delta": 1e-4}


def ledger_with(*rounds: int) -> InstitutionLedger:
    return InstitutionLedger([Release("s", r, 1.0, 0.1, 10) for r in rounds], {"s": StudyTerms(1e-4, "rdp", 1.0)})


def test_an_accounted_update_without_a_ledger_receipt_cannot_be_made():
    with pytest.raises(LedgerError, match="receipt"):
        Released(STATE, ACCOUNTED, ledger_with(1), POLICY, None)
    Released(STATE, {"num-examples": 100.0}, None, POLICY, None)  # privacy off: nothing accounted


def test_receipts_come_only_from_a_ledger_that_holds_the_round(tmp_path):
    store = InstitutionState(tmp_path)
    with pytest.raises(LedgerError):
        store.save_ledger(ledger_with(1), "s", 2)
    assert store.load_ledger() is None  # refused before anything was written
    receipt = store.save_ledger(ledger_with(1, 2), "s", 2)
    assert Released(STATE, ACCOUNTED, ledger_with(1, 2), POLICY, receipt).receipt.path == store.ledger_path
    with pytest.raises(LedgerError):
        LedgerReceipt.in_memory(ledger_with(1), "s", 2)


@pytest.mark.parametrize("recipe", ["linear-probe", "lora"])
@pytest.mark.usefixtures("task_identity")
def test_the_ledger_charges_every_noised_step_and_every_feature_mean(tmp_path, monkeypatch, recipe):
    """Count what the client actually releases (each PrivateGradientEngine step, each DP feature
    mean) and compare with the releases the institution's ledger holds after the round: the epsilon
    it reports is the accountant's over all of them, neither more nor fewer steps."""
    from fed_dp_lora.client_app import app
    from fed_dp_lora.privacy.accountant import PrivacyLedger
    from fed_dp_lora.privacy.engine import PrivateGradientEngine
    from fed_dp_lora.probe import centring
    from tests.client_helpers import (STUDY, bank_file, global_adapter, institution_config, ledger_of, make_context,
                                      ok_metrics, train_message)

    noised, means = [], []
    finalize, private_mean = PrivateGradientEngine.finalize, centring.private_mean
    monkeypatch.setattr(PrivateGradientEngine, "finalize",
                        lambda self, n: noised.append(1) or finalize(self, n))
    monkeypatch.setattr(centring, "private_mean", lambda *a, **k: means.append(1) or private_mean(*a, **k))
    overrides = f"+preset=tiny recipe={recipe} train.batch_size=16 train.epochs=0.5 privacy.epsilon=8 rounds=2"
    node = institution_config(bank_file(tmp_path / "bank.csv", 60), tmp_path / "state", records=100)
    reply = app(train_message(global_adapter(overrides), 1, study=STUDY), context := make_context(overrides, node))
    m = ok_metrics(reply)
    ledger = InstitutionLedger.from_dict(ledger_of(context))
    steps = [r for r in ledger.releases if r.kind == "dp-sgd"]
    assert len(steps) == 1 and steps[0].steps == len(noised) == int(m["steps"]) > 0
    assert sum(r.kind == "feature-mean" for r in ledger.releases) == len(means) == (recipe == "linear-probe")
    history = [(r.noise, r.rate, r.steps) for r in ledger.releases]
    assert m["epsilon"] == pytest.approx(PrivacyLedger("rdp", m["delta"], history).epsilon(), rel=1e-12)
