"""The institution's on-disk privacy state: ledger, noise key, kept release, reconciliation."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.ledger_store import ClientStateDir, LedgerError, reconcile, state_digest


def ledger(*rounds: int) -> PrivacyLedger:
    out = PrivacyLedger("rdp", 1e-5)
    for r in rounds:
        out.record(1.1, 0.1, 10, r)
    return out


def test_ledger_round_trips_with_its_rounds(tmp_path):
    store = ClientStateDir(tmp_path, "study-a")
    assert store.load_ledger() is None
    store.save_ledger(ledger(1, 2))
    back = ClientStateDir(tmp_path, "study-a").load_ledger()
    assert back == ledger(1, 2) and back.rounds == [1, 2]
    assert ClientStateDir(tmp_path, "study-b").load_ledger() is None  # one ledger per study


@pytest.mark.parametrize("damage", ["{not json", '{"study": "study-a"}',
                                    '{"study": "other", "ledger": {}}', ""])
def test_an_unreadable_ledger_refuses_instead_of_restarting_from_zero(tmp_path, damage):
    store = ClientStateDir(tmp_path, "study-a")
    store.save_ledger(ledger(1))
    store.ledger_path.write_text(damage)
    with pytest.raises(LedgerError, match=str(store.ledger_path)):
        store.load_ledger()


def test_noise_key_is_created_once_private_and_stable(tmp_path):
    key = ClientStateDir(tmp_path, "s").secret()
    assert len(key) == 32 and ClientStateDir(tmp_path, "other").secret() == key
    assert stat.S_IMODE((tmp_path / "noise.key").stat().st_mode) == 0o600
    (tmp_path / "noise.key").write_bytes(b"short")
    with pytest.raises(LedgerError, match="noise key"):
        ClientStateDir(tmp_path, "s").secret()


def test_release_is_found_only_for_its_round_and_global_adapter(tmp_path):
    store = ClientStateDir(tmp_path, "s")
    state = {"a": torch.randn(3, 2), "b": torch.zeros(4)}
    digest = state_digest(state)
    store.save_release(2, digest, state, {"epsilon": 1.5})
    kept, metrics = store.release(2, digest)
    assert all(torch.equal(kept[k], state[k]) for k in state) and metrics == {"epsilon": 1.5}
    assert store.release(3, digest) is None
    assert store.release(2, state_digest({**state, "b": torch.ones(4)})) is None


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
    other = PrivacyLedger("rdp", 1e-5)
    other.record(2.0, 0.1, 10, 1)
    with pytest.raises(LedgerError, match="disagrees"):
        reconcile(other, ledger(1, 2), tmp_path)


def test_ledger_file_is_plain_json_an_auditor_can_read(tmp_path):
    store = ClientStateDir(tmp_path, "s")
    store.save_ledger(ledger(1))
    data = json.loads(store.ledger_path.read_text())
    assert data["study"] == "s" and data["ledger"]["rounds"] == [1] and data["ledger"]["steps"] == [10]
