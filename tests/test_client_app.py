"""The real ClientApp, called directly: `client_app.app(msg, context)`.

Flower keeps one Context per node between messages and (in deployment) starts a new
ClientApp process per message, so everything a client must remember (its privacy ledger)
has to live in `context.state`. These tests drive the app the way the runtime does and
check replies, metrics and the state left behind.

Each call trains one Poisson step (train.epochs is tiny, so epochs / q rounds to 0 and the
round plans max(1, 0) = 1 step) on an expected batch of 16: about a second on CPU.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fed_dp_lora import local_round
from fed_dp_lora.client_app import LEDGER_KEY, REFUSED_BUDGET, REFUSED_CONFIG, REFUSED_LEDGER, app
from fed_dp_lora.config import load_config
from fed_dp_lora.data.sources import CREDIT_LABELS, credit_table
from fed_dp_lora.local_round import cached_model
from fed_dp_lora.models import trainable_state
from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.ledger_store import ClientStateDir

FAST = "+preset=tiny train.batch_size=16 train.epochs=0.001"
FIXED_NOISE = f"{FAST} privacy.noise_multiplier=1.0 rounds=3"
SIM_NODE = {"partition-id": 0, "num-partitions": 3}


pytestmark = pytest.mark.usefixtures("task_identity")


def run_config(overrides: str) -> dict:
    return {"overrides": overrides, "output-dir": ""}


def make_context(overrides: str, node_config: dict | None = None, node_id: int = 11) -> Context:
    return Context(
        run_id=7,
        node_id=node_id,
        node_config=dict(SIM_NODE if node_config is None else node_config),
        state=RecordDict(),
        run_config=run_config(overrides),
    )


def global_adapter(overrides: str) -> dict[str, torch.Tensor]:
    """A valid global adapter for this config (the process-wide model's trainable tensors)."""
    return trainable_state(cached_model(load_config(run_config(overrides))))


def train_message(state: dict[str, torch.Tensor], server_round: int, node_id: int = 11,
                  study: str | None = None) -> Message:
    config = {"server-round": server_round, **({"study-id": study} if study else {})}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def ok_metrics(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays"}
    return dict(reply.content.metric_records["metrics"])


def ledger_of(context: Context) -> dict | None:
    record = context.state.config_records.get(LEDGER_KEY)
    return None if record is None else dict(record)


def ledger_from_metrics(*rounds: dict[str, float]) -> PrivacyLedger:
    """An independent ledger from what the client reported: (noise, rate, steps) per round."""
    ledger = PrivacyLedger(accountant="rdp", delta=rounds[0]["delta"])
    for m in rounds:
        ledger.record(m["noise-multiplier"], m["sample-rate"], int(m["steps"]))
    return ledger


def test_ledger_in_context_state_composes_epsilon_over_rounds():
    state = global_adapter(FIXED_NOISE)
    context = make_context(FIXED_NOISE)

    m1 = ok_metrics(app(train_message(state, 1), context))
    assert m1["noise-multiplier"] == 1.0 and m1["steps"] == 1 and m1["steps-total"] == 1
    ledger1 = ledger_of(context)
    assert ledger1 is not None, "no privacy ledger in context.state after a DP round"
    assert ledger1["steps"] == [1] and ledger1["noise"] == [1.0]
    assert m1["epsilon"] == pytest.approx(ledger_from_metrics(m1).epsilon(), rel=1e-12)

    # Round 2 on the same Context object, as the runtime keeps it between messages.
    m2 = ok_metrics(app(train_message(state, 2), context))
    both = ledger_from_metrics(m1, m2)
    assert m2["epsilon"] == pytest.approx(both.epsilon(), rel=1e-12)
    assert m2["epsilon"] > m1["epsilon"] * 1.01
    assert m2["steps-total"] == m1["steps"] + m2["steps"] == 2
    assert ledger_of(context)["steps"] == [1, 1]

    # A fresh Context (no ledger) restarts at the round-1 epsilon: nothing else carries it ...
    fresh = make_context(FIXED_NOISE)
    m_fresh = ok_metrics(app(train_message(state, 2), fresh))
    assert m_fresh["epsilon"] == pytest.approx(m1["epsilon"], rel=1e-12)
    assert m_fresh["steps-total"] == 1

    # ... while a new Context holding only a copy of the ledger (what a new deployment
    # process gets back from the SuperNode) keeps composing.
    restored = make_context(FIXED_NOISE)
    restored.state[LEDGER_KEY] = ConfigRecord(ledger_of(context))
    m3 = ok_metrics(app(train_message(state, 3), restored))
    assert m3["epsilon"] == pytest.approx(ledger_from_metrics(m1, m2, m3).epsilon(), rel=1e-12)
    assert m3["epsilon"] > m2["epsilon"] and m3["steps-total"] == 3


def test_second_round_refused_when_the_planned_budget_is_spent():
    # Noise is calibrated so that the planned run (rounds=1) spends exactly privacy.epsilon.
    overrides = f"{FAST} privacy.epsilon=2 rounds=1"
    state = global_adapter(overrides)
    context = make_context(overrides)

    m1 = ok_metrics(app(train_message(state, 1), context))
    assert 1.9 < m1["epsilon"] <= 2.0 * (1 + 1e-9)
    ledger_before = ledger_of(context)

    sent = {k: v + 0.01 for k, v in state.items()}  # a new global adapter for round 2
    reply = app(train_message(sent, 2), context)

    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == REFUSED_BUDGET
    assert "budget 2" in reply.error.reason, reply.error.reason
    assert ledger_of(context) == ledger_before, "a refused round must not touch the ledger"
    # No step was taken: the client's model holds exactly the adapter it was sent.
    model_now = trainable_state(cached_model(load_config(run_config(overrides))))
    assert model_now.keys() == sent.keys()
    for key in sent:
        assert torch.equal(model_now[key], sent[key]), key


def test_missing_data_file_is_a_config_refusal_naming_the_file(tmp_path):
    missing = tmp_path / "institution-7.csv"
    context = make_context(FIXED_NOISE, node_config={"data-path": str(missing), "state-dir": str(tmp_path / "s")})
    reply = app(train_message(global_adapter(FIXED_NOISE), 1), context)

    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == REFUSED_CONFIG
    assert str(missing) in reply.error.reason and "DataError" in reply.error.reason
    assert ledger_of(context) is None


def test_deployment_node_trains_on_its_data_path_file(tmp_path):
    table = credit_table("classification").sample(n=40, random_state=3)
    csv = tmp_path / "bank.csv"
    pd.DataFrame(
        {"text": table["text"], "label": [CREDIT_LABELS[i] for i in table["label"]]}
    ).to_csv(csv, index=False)

    state = global_adapter(FIXED_NOISE)
    context = make_context(FIXED_NOISE, node_config={"data-path": str(csv), "state-dir": str(tmp_path / "s")})
    reply = app(train_message(state, 1), context)
    m = ok_metrics(reply)

    assert m["num-examples"] == 40  # the file's records, not a simulation partition
    assert "partition-id" not in m
    assert m["sample-rate"] == pytest.approx(16 / 40)
    assert m["delta"] == pytest.approx(1 / (10 * 40))  # delta from this file's n
    assert ledger_of(context)["steps"] == [int(m["steps"])]

    returned = reply.content["arrays"].to_torch_state_dict()
    assert returned.keys() == state.keys()
    changed = [k for k in state if not torch.equal(returned[k], state[k])]
    assert changed, "the adapter came back unchanged: no training happened"


# --- deployment: the ledger on the institution's disk, kept releases, the noise key ----------

STUDY = "study-1"


@pytest.fixture(scope="module")
def bank_csv(tmp_path_factory):
    table = credit_table("classification").sample(n=60, random_state=5)
    csv = tmp_path_factory.mktemp("bank") / "bank.csv"
    pd.DataFrame({"text": table["text"], "label": [CREDIT_LABELS[i] for i in table["label"]]}).to_csv(csv, index=False)
    return csv


def institution(bank_csv, state_dir, **extra) -> Context:
    return make_context(FIXED_NOISE, node_config={"data-path": str(bank_csv), "state-dir": str(state_dir), **extra})


def arrays_of(reply: Message) -> dict[str, torch.Tensor]:
    return reply.content["arrays"].to_torch_state_dict()


def test_ledger_survives_a_supernode_restart_on_the_institution_disk(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    m1 = ok_metrics(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path)))
    # The SuperNode restarts: a new Context with empty state, same state-dir.
    m2 = ok_metrics(app(train_message(state, 2, study=STUDY), institution(bank_csv, tmp_path)))
    assert m2["steps-total"] == m1["steps"] + m2["steps"]
    assert m2["epsilon"] == pytest.approx(ledger_from_metrics(m1, m2).epsilon(), rel=1e-12)
    stored = ClientStateDir(tmp_path, STUDY).load_ledger()
    assert stored.rounds == [1, 2] and stored.epsilon() == pytest.approx(m2["epsilon"], rel=1e-12)
    assert ClientStateDir(tmp_path, "another-study").load_ledger() is None


def test_an_unreadable_ledger_makes_the_node_refuse_to_train(bank_csv, tmp_path, monkeypatch):
    state = global_adapter(FIXED_NOISE)
    ok_metrics(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path)))
    path = ClientStateDir(tmp_path, STUDY).ledger_path
    path.write_text('{"study": "study-1", "ledger": {"noise": [1.0]')  # torn / damaged
    called = []
    monkeypatch.setattr(local_round, "train_local", lambda *a, **k: called.append(1))
    reply = app(train_message(state, 2, study=STUDY), institution(bank_csv, tmp_path))
    assert reply.has_error() and reply.error.code == REFUSED_LEDGER
    assert str(path) in reply.error.reason and "zero epsilon" in reply.error.reason
    assert called == [] and path.read_text().endswith("[1.0]")


def test_a_round_trained_again_on_the_same_adapter_resends_its_update_at_no_cost(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    first = app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path))
    m1 = ok_metrics(first)
    # The server was stopped before it finished round 1 and asks again, from a new process.
    again = app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path))
    m_again = ok_metrics(again)
    assert m_again["replayed"] == 1.0 and m_again["epsilon"] == m1["epsilon"]
    assert all(torch.equal(arrays_of(again)[k], arrays_of(first)[k]) for k in state)
    assert ClientStateDir(tmp_path, STUDY).load_ledger().rounds == [1]
    # A different global adapter for the same round is a new release, and is counted.
    other = {k: v + 0.01 for k, v in state.items()}
    m_other = ok_metrics(app(train_message(other, 1, study=STUDY), institution(bank_csv, tmp_path)))
    assert m_other["replayed"] == 0.0 and m_other["steps-total"] == 2 * m1["steps"]
    assert ClientStateDir(tmp_path, STUDY).load_ledger().rounds == [1, 1]


def test_the_noise_comes_from_the_institution_key(bank_csv, tmp_path):
    state = global_adapter(FIXED_NOISE)
    a = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "a")))
    b = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "b")))
    assert any(not torch.equal(a[k], b[k]) for k in state), "two keys, same noise"
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / "noise.key", tmp_path / "c" / "noise.key")
    c = arrays_of(app(train_message(state, 1, study=STUDY), institution(bank_csv, tmp_path / "c")))
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in state), "same key, same round: same draw"
    d = arrays_of(app(train_message(state, 1, study="study-2"), institution(bank_csv, tmp_path / "c")))
    assert any(not torch.equal(a[k], d[k]) for k in state), "two studies must never share noise"


def test_an_institution_budget_below_the_run_budget_calibrates_more_noise(bank_csv, tmp_path):
    overrides = f"{FAST} privacy.epsilon=8 rounds=2"
    state = global_adapter(overrides)
    node = {"data-path": str(bank_csv), "state-dir": str(tmp_path / "x")}
    loose = ok_metrics(app(train_message(state, 1, study=STUDY), make_context(overrides, node_config=node)))
    strict_node = {**node, "state-dir": str(tmp_path / "y"), "epsilon": 1.0}
    strict = ok_metrics(app(train_message(state, 1, study=STUDY), make_context(overrides, node_config=strict_node)))
    assert strict["noise-multiplier"] > loose["noise-multiplier"] * 1.5
    assert strict["epsilon"] <= 1.0 * (1 + 1e-9) < loose["epsilon"]


def test_cold_start_load_and_train_times_are_reported(bank_csv, tmp_path):
    m = ok_metrics(app(train_message(global_adapter(FIXED_NOISE), 1, study=STUDY), institution(bank_csv, tmp_path)))
    assert m["load-seconds"] > 0 and m["train-seconds"] > 0 and m["startup-seconds"] >= 0


def test_int8_upload_sends_the_quantized_update_after_the_noise():
    overrides = f"{FIXED_NOISE} upload.compression=int8"
    state = global_adapter(overrides)
    reply = app(train_message(state, 1), make_context(overrides))
    assert not reply.has_error(), reply.error
    assert dict(reply.content.config_records["upload"]) == {"encoding": "int8-update"}
    arrays = reply.content["arrays"]
    assert {k for k in arrays.keys() if not k.endswith("|scale")} == set(state)
    assert all(arrays[k].numpy().dtype.name == "int8" for k in state)


def test_a_deployment_client_tokenizes_its_file_once(bank_csv, tmp_path, monkeypatch):
    cfg = load_config(run_config(FIXED_NOISE))
    node = {"data-path": str(bank_csv), "state-dir": str(tmp_path)}
    first = local_round.client_data(cfg, node)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    local_round._cached_client_data.cache_clear()  # a new process: only the disk remembers
    monkeypatch.setattr(local_round, "load_table", lambda *a, **k: pytest.fail("the file was read again"))
    again = local_round.client_data(cfg, node)
    assert torch.equal(again.input_ids, first.input_ids) and torch.equal(again.labels, first.labels)
    monkeypatch.undo()
    edited = tmp_path / "edited.csv"
    pd.read_csv(bank_csv).head(10).to_csv(edited, index=False)
    assert len(local_round.client_data(cfg, {**node, "data-path": str(edited)})) == 10
