"""The real ClientApp, called directly: `client_app.app(msg, context)`.

Flower keeps one Context per node between messages and (in deployment) starts a new
ClientApp process per message, so everything a client must remember lives in `context.state`
and, for an institution, in its state dir. These tests drive the app the way the runtime does
and check replies, metrics and the state left behind.

Each call trains one Poisson step (train.epochs is tiny, so the round plans one step) on an
expected batch of 16: about a second on CPU.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord

from fed_dp_lora import client_round, local_log
from fed_dp_lora.client_app import LEDGER_KEY, app
from fed_dp_lora.client_data import cached_model
from fed_dp_lora.config import load_config
from fed_dp_lora.models import trainable_state
from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.ledger_store import InstitutionState
from fed_dp_lora.reply import REFUSAL_TEXT, Refusal
from tests.client_helpers import (FAST, FIXED_NOISE, STUDY, arrays_of, bank_file, global_adapter,
                                  institution_config, ledger_of, make_context, ok_metrics, run_config,
                                  train_message)

pytestmark = pytest.mark.usefixtures("task_identity")


def ledger_from_metrics(*rounds: dict[str, float]) -> PrivacyLedger:
    """An independent ledger from what the client reported: (noise, rate, steps) per round."""
    ledger = PrivacyLedger(accountant="rdp", delta=rounds[0]["delta"])
    for m in rounds:
        ledger.record(m["noise-multiplier"], m["sample-rate"], int(m["steps"]))
    return ledger


def assert_refused(reply, code: Refusal) -> None:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == code, reply.error
    assert reply.error.reason == REFUSAL_TEXT[code], "a refusal's text must be the fixed one"


def test_ledger_in_context_state_composes_epsilon_over_rounds():
    state = global_adapter(FIXED_NOISE)
    context = make_context(FIXED_NOISE)

    m1 = ok_metrics(app(train_message(state, 1), context))
    assert m1["noise-multiplier"] == 1.0 and m1["steps"] == 1 and m1["steps-total"] == 1
    assert ledger_of(context)["steps"] == [1] and ledger_of(context)["noise"] == [1.0]
    assert m1["epsilon"] == pytest.approx(ledger_from_metrics(m1).epsilon(), rel=1e-12)

    # Round 2 on the same Context object, as the runtime keeps it between messages.
    m2 = ok_metrics(app(train_message(state, 2), context))
    assert m2["epsilon"] == pytest.approx(ledger_from_metrics(m1, m2).epsilon(), rel=1e-12)
    assert m2["epsilon"] > m1["epsilon"] * 1.01 and m2["steps-total"] == 2
    assert ledger_of(context)["steps"] == [1, 1]

    # A new Context holding only a copy of the ledger (what a new deployment process gets back
    # from the SuperNode) keeps composing.
    restored = make_context(FIXED_NOISE)
    restored.state[LEDGER_KEY] = ConfigRecord(ledger_of(context))
    m3 = ok_metrics(app(train_message(state, 3), restored))
    assert m3["epsilon"] == pytest.approx(ledger_from_metrics(m1, m2, m3).epsilon(), rel=1e-12)


def test_second_round_refused_when_the_planned_budget_is_spent():
    # Noise is calibrated so that the planned run (rounds=1) spends exactly privacy.epsilon.
    overrides = f"{FAST} privacy.epsilon=2 rounds=1"
    state = global_adapter(overrides)
    context = make_context(overrides)
    m1 = ok_metrics(app(train_message(state, 1), context))
    assert 1.9 < m1["epsilon"] <= 2.0 * (1 + 1e-9)
    ledger_before = ledger_of(context)

    sent = {k: v + 0.01 for k, v in state.items()}  # a new global adapter for round 2
    assert_refused(app(train_message(sent, 2), context), Refusal.BUDGET)
    assert ledger_of(context) == ledger_before, "a refused round must not touch the ledger"
    # No step was taken: the client's model holds exactly the adapter it was sent.
    model_now = trainable_state(cached_model(load_config(run_config(overrides))))
    assert all(torch.equal(model_now[k], sent[k]) for k in sent)


def test_a_missing_file_is_refused_with_a_fixed_text_and_logged_locally(tmp_path):
    missing = tmp_path / "institution-7.csv"
    context = make_context(FIXED_NOISE, institution_config(missing, tmp_path / "s"))
    assert_refused(app(train_message(global_adapter(FIXED_NOISE), 1, study=STUDY), context), Refusal.DATA)
    assert ledger_of(context) is None
    [event] = local_log.read(tmp_path / "s")
    assert event["event"] == "refused" and str(missing) in event["detail"]


def test_an_institution_sends_its_declared_count_never_its_file_count(tmp_path):
    csv = bank_file(tmp_path / "bank.csv", 40)
    state = global_adapter(FIXED_NOISE)
    node = institution_config(csv, tmp_path / "s", records=64)
    reply = app(train_message(state, 1, study=STUDY), make_context(FIXED_NOISE, node))
    m = ok_metrics(reply)
    assert m["num-examples"] == 64 and "partition-id" not in m
    assert m["sample-rate"] == pytest.approx(16 / 64) and m["delta"] == pytest.approx(1 / 640)
    changed = [k for k in state if not torch.equal(arrays_of(reply)[k], state[k])]
    assert changed, "the adapter came back unchanged: no training happened"
    [event] = local_log.read(tmp_path / "s")
    assert event["records-used"] == 40 and "train-loss" in event and "train-seconds" in event


def test_more_records_than_declared_is_refused_by_policy(tmp_path):
    csv = bank_file(tmp_path / "bank.csv", 40)
    context = make_context(FIXED_NOISE, institution_config(csv, tmp_path / "s", records=30))
    assert_refused(app(train_message(global_adapter(FIXED_NOISE), 1, study=STUDY), context), Refusal.POLICY)
    assert "declare records >= 40" in local_log.read(tmp_path / "s")[0]["detail"]


# --- the institution's disk: ledger, kept releases, noise key, owner -----------------------------

@pytest.fixture(scope="module")
def bank_csv(tmp_path_factory):
    return bank_file(tmp_path_factory.mktemp("bank") / "bank.csv", 60)


def institution(bank_csv, state_dir, overrides: str = FIXED_NOISE, node_id: int = 11, **extra):
    return make_context(overrides, institution_config(bank_csv, state_dir, **extra), node_id=node_id)


def test_ledger_survives_a_supernode_restart_on_the_institution_disk(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    m1 = ok_metrics(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path)))
    # The SuperNode restarts: a new Context with empty state, same state-dir.
    m2 = ok_metrics(app(train_message(state, 2, study=STUDY), institution(bank_csv, tmp_path)))
    assert m2["steps-total"] == m1["steps"] + m2["steps"]
    assert m2["epsilon"] == pytest.approx(ledger_from_metrics(m1, m2).epsilon(), rel=1e-12)
    stored = InstitutionState(tmp_path).load_ledger()
    assert [r.round for r in stored.releases] == [1, 2]
    assert stored.study(STUDY).epsilon() == pytest.approx(m2["epsilon"], rel=1e-12)


def test_an_unreadable_ledger_makes_the_node_refuse_to_train(bank_csv, tmp_path, monkeypatch):
    state = global_adapter(FIXED_NOISE)
    ok_metrics(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path)))
    path = InstitutionState(tmp_path).ledger_path
    path.write_text('{"ledger": {"version": 2, "noise": [1.0]')  # torn / damaged
    called = []
    monkeypatch.setattr(client_round, "train_local", lambda *a, **k: called.append(1))
    assert_refused(app(train_message(state, 2, study=STUDY), institution(bank_csv, tmp_path)), Refusal.LEDGER)
    assert called == [] and path.read_text().endswith("[1.0]")


def test_a_round_asked_again_on_the_same_adapter_resends_its_update_at_no_cost(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    first = app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path))
    m1 = ok_metrics(first)
    # The server was stopped before it finished round 1 and asks again, from a new process.
    again = app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path))
    m_again = ok_metrics(again)
    assert m_again["replayed"] == 1.0 and m_again["epsilon"] == m1["epsilon"]
    assert all(torch.equal(arrays_of(again)[k], arrays_of(first)[k]) for k in state)
    assert len(InstitutionState(tmp_path).load_ledger().releases) == 1
    # A different global adapter for the same round is a new release, and is counted.
    other = {k: v + 0.01 for k, v in state.items()}
    m_other = ok_metrics(app(train_message(other, 1, study=STUDY), institution(bank_csv, tmp_path)))
    assert m_other["replayed"] == 0.0 and m_other["steps-total"] == 2 * m1["steps"]
    assert [r.round for r in InstitutionState(tmp_path).load_ledger().releases] == [1, 1]


def test_the_noise_comes_from_the_institution_key(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    a = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "a")))
    b = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "b")))
    assert any(not torch.equal(a[k], b[k]) for k in state), "two keys, same noise"
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / "noise.key", tmp_path / "c" / "noise.key")
    c = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "c")))
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in state), "same key, round, adapter, attempt"
    d = arrays_of(app(train_message(state, 1, study="study-2"), institution(bank_csv, tmp_path / "c")))
    assert any(not torch.equal(a[k], d[k]) for k in state), "two studies must never share noise"


def test_the_lifetime_budget_spans_studies_so_a_new_study_cannot_reset_it(bank_csv, tmp_path):
    overrides = f"{FAST} privacy.epsilon=8 rounds=1"
    state = global_adapter(overrides)
    m1 = ok_metrics(app(train_message(state, 1, study="s1"), institution(bank_csv, tmp_path, overrides, epsilon=3.0)))
    assert 2.9 < m1["epsilon"] <= 3.0 * (1 + 1e-9), "noise calibrated to the smaller, lifetime budget"
    # A new study id from the server: the lifetime ledger still holds s1, so s2 gets only what
    # is left: far more noise, and the lifetime epsilon stays within the institution's budget.
    m2 = ok_metrics(app(train_message(state, 1, study="s2"), institution(bank_csv, tmp_path, overrides, epsilon=3.0)))
    assert m2["noise-multiplier"] > 3 * m1["noise-multiplier"] and m2["epsilon"] < m1["epsilon"] / 5
    lifetime = [e["lifetime-epsilon"] for e in local_log.read(tmp_path) if e["event"] == "round"]
    assert lifetime[0] < lifetime[1] <= 3.0 * (1 + 1e-9)
    # Nothing meaningful left: refused before training.
    reply = app(train_message(state, 1, study="s3"), institution(bank_csv, tmp_path / "x", overrides, epsilon=1e-4))
    assert_refused(reply, Refusal.BUDGET)


def test_a_state_dir_belongs_to_one_node(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    ok_metrics(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path, node_id=11)))
    other = app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path, node_id=12))
    assert_refused(other, Refusal.LEDGER)
    assert "belongs to node 11" in local_log.read(tmp_path)[-1]["detail"]


def test_int8_upload_sends_the_quantized_update_after_the_noise():
    overrides = f"{FIXED_NOISE} upload.compression=int8"
    state = global_adapter(overrides)
    reply = app(train_message(state, 1), make_context(overrides))
    assert not reply.has_error(), reply.error
    assert dict(reply.content.config_records["upload"]) == {"encoding": "int8-update"}
    arrays = reply.content["arrays"]
    assert {k for k in arrays.keys() if not k.endswith("|scale")} == set(state)
    assert all(arrays[k].numpy().dtype.name == "int8" for k in state)


def test_the_declared_name_travels_as_public_metadata(bank_csv, tmp_path):
    reply = app(train_message(global_adapter(FIXED_NOISE), 1, study=STUDY),
                institution(bank_csv, tmp_path, name="bank-a"))
    ok_metrics(reply)
    assert dict(reply.content["node"]) == {"name": "bank-a"}


def test_a_deployment_client_tokenizes_its_file_once(bank_csv, tmp_path, monkeypatch):
    from fed_dp_lora import client_data as data_module
    from fed_dp_lora.node_policy import apply_node_config

    cfg, policy = apply_node_config(load_config(run_config(FIXED_NOISE)), institution_config(bank_csv, tmp_path))
    first = data_module.client_data(cfg, policy)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    data_module._cached_table.cache_clear()  # a new process: only the disk remembers
    monkeypatch.setattr(data_module, "load_table", lambda *a, **k: pytest.fail("the file was read again"))
    again = data_module.client_data(cfg, policy)
    assert torch.equal(again.encoded.input_ids, first.encoded.input_ids) and again.records == first.records
    monkeypatch.undo()
    edited = tmp_path / "edited.csv"
    pd.read_csv(bank_csv).head(10).to_csv(edited, index=False)
    _, policy = apply_node_config(cfg, institution_config(edited, tmp_path))
    assert len(data_module.client_data(cfg, policy).encoded) == 10
