"""The institution's on-disk privacy state: ledger, noise key, attempts, kept release, owner."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Release, StudyTerms
from fed_dp_lora.privacy.ledger_store import InstitutionState, LedgerError, LedgerReceipt, reconcile, state_digest


def ledger(*rounds: int, study: str = "study-a") -> InstitutionLedger:
    return InstitutionLedger([Release(study, r, 1.1, 0.1, 10) for r in rounds], {study: StudyTerms(1e-5, "rdp", 1.1)})


def test_ledger_round_trips_with_every_study(tmp_path):
    store = InstitutionState(tmp_path)
    assert store.load_ledger() is None
    both = ledger(1, 2)
    both.releases.append(Release("study-b", 1, 2.0, 0.2, 5))
    both.studies["study-b"] = StudyTerms(1e-6, "prv", 2.0)
    store.save_ledger(both, "study-b", 1)
    assert InstitutionState(tmp_path).load_ledger() == both


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        '{"other": 1}',
        '{"ledger": {"version": 1}}',
        '{"ledger": {"version": 2, "study": ["a"], "round": []}}',
        "",
    ],
)
def test_an_unreadable_ledger_refuses_instead_of_restarting_from_zero(tmp_path, damage):
    store = InstitutionState(tmp_path)
    store.save_ledger(ledger(1), "study-a", 1)
    store.ledger_path.write_text(damage)
    with pytest.raises(LedgerError, match=str(store.ledger_path)):
        store.load_ledger()


def test_per_study_ledgers_of_earlier_versions_are_folded_into_the_lifetime_ledger(tmp_path):
    old = PrivacyLedger("rdp", 1e-5)
    old.record(1.1, 0.1, 10, 1)
    old.record(1.1, 0.1, 10, 2)
    (tmp_path / "ledger-s1.json").write_text(json.dumps({"study": "s1", "ledger": old.to_dict()}))
    migrated = InstitutionState(tmp_path).load_ledger()
    assert migrated.study("s1").epsilon() == pytest.approx(old.epsilon(), rel=1e-12)
    assert (tmp_path / "ledger.json").is_file() and (tmp_path / "ledger-s1.json.migrated").is_file()


def test_noise_key_is_created_once_private_and_stable(tmp_path):
    key = InstitutionState(tmp_path).secret()
    assert len(key) == 32 and InstitutionState(tmp_path).secret() == key
    assert stat.S_IMODE((tmp_path / "noise.key").stat().st_mode) == 0o600
    (tmp_path / "noise.key").write_bytes(b"short")
    with pytest.raises(LedgerError, match="noise key"):
        InstitutionState(tmp_path).secret()


def test_attempts_are_counted_durably_per_study_and_round(tmp_path):
    store = InstitutionState(tmp_path)
    assert [store.next_attempt("s", 1) for _ in range(3)] == [1, 2, 3]
    assert InstitutionState(tmp_path).next_attempt("s", 1) == 4  # a new process continues the count
    assert store.next_attempt("s", 2) == 1 and store.next_attempt("t", 1) == 1


def test_a_state_dir_is_claimed_by_one_node(tmp_path):
    InstitutionState(tmp_path).claim(7)
    InstitutionState(tmp_path).claim(7)
    with pytest.raises(LedgerError, match="belongs to node 7.*own --state-dir"):
        InstitutionState(tmp_path).claim(8)


def test_release_is_found_only_for_its_study_round_and_global_adapter(tmp_path):
    store = InstitutionState(tmp_path)
    state = {"a": torch.randn(3, 2), "b": torch.zeros(4)}
    digest = state_digest(state)
    store.save_release("s", 2, digest, state, {"epsilon": 1.5})
    kept, metrics = store.release("s", 2, digest)
    assert all(torch.equal(kept[k], state[k]) for k in state) and metrics == {"epsilon": 1.5}
    assert store.release("s", 3, digest) is None and store.release("other", 2, digest) is None
    assert store.release("s", 2, state_digest({**state, "b": torch.ones(4)})) is None


def test_digest_sees_values_names_and_shapes():
    base = {"a": torch.arange(6.0).reshape(2, 3)}
    assert state_digest(base) == state_digest({"a": torch.arange(6.0).reshape(2, 3)})
    assert state_digest(base) != state_digest({"a": torch.arange(6.0).reshape(3, 2)})
    assert state_digest(base) != state_digest({"x": torch.arange(6.0).reshape(2, 3)})
    assert state_digest(base) != state_digest({"a": torch.arange(6.0).reshape(2, 3) + 1e-7})


def test_reconcile_takes_the_longer_copy_and_refuses_disagreement(tmp_path):
    assert reconcile(ledger(1), None, tmp_path) == ledger(1)
    assert reconcile(None, ledger(1, 2), tmp_path) == ledger(1, 2)
    assert reconcile(ledger(1), ledger(1, 2), tmp_path) == ledger(1, 2)
    assert reconcile(ledger(1, 2), ledger(1), tmp_path) == ledger(1, 2)
    other = InstitutionLedger([Release("study-a", 1, 2.0, 0.1, 10)], {"study-a": StudyTerms(1e-5, "rdp", 2.0)})
    with pytest.raises(LedgerError, match="disagrees"):
        reconcile(other, ledger(1, 2), tmp_path)


def test_ledger_file_is_plain_json_an_auditor_can_read(tmp_path):
    store = InstitutionState(tmp_path)
    store.save_ledger(ledger(1), "study-a", 1)
    data = json.loads(store.ledger_path.read_text())["ledger"]
    assert data["study"] == ["study-a"] and data["round"] == [1] and data["steps"] == [10]


def test_a_receipt_is_only_given_for_a_round_the_saved_ledger_holds(tmp_path):
    store = InstitutionState(tmp_path)
    receipt = store.save_ledger(ledger(1, 2), "study-a", 2)
    assert receipt == LedgerReceipt(store.ledger_path, "study-a", 2) == store.receipt_on_disk("study-a", 2)
    with pytest.raises(LedgerError, match="not in the ledger"):
        store.save_ledger(ledger(1), "study-a", 2)
    with pytest.raises(LedgerError, match="not in"):
        store.receipt_on_disk("study-b", 1)
    assert InstitutionState(tmp_path).load_ledger() == ledger(1, 2)  # the refused save wrote nothing
