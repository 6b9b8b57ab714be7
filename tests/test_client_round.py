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
