"""What the server sees, tested as an attacker would: the same request on D and on D plus one record.

The neighbouring relation is add/remove one record, with the record count private. Everything a
reply carries besides the adapter must then be identical for D and D + 1, whatever the added
record is and whether or not it was sampled; and when it was not sampled, the adapter must be
identical too. Each channel the server could use (metrics, error texts, non-finite updates, noise
reused across releases, compute shapes behind the reply's timing, SecAgg+ metadata) has a test.
"""

from __future__ import annotations

import secrets

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat

from fed_dp_lora import client_round
from fed_dp_lora.client_app import app
from fed_dp_lora.client_data import cached_model
from fed_dp_lora.config import load_config
from fed_dp_lora.node_policy import apply_node_config
from fed_dp_lora.privacy.ledger_store import state_digest
from fed_dp_lora.privacy.streams import StreamKey, institution_secret, round_generators
from fed_dp_lora.reply import METRICS, REFUSAL_TEXT, Refusal, metrics
from fed_dp_lora.wire import SECAGG_KEYS
from tests.client_helpers import (FAST, STUDY, arrays_of, bank_file, global_adapter, institution_config,
                                  make_context, ok_metrics, run_config, train_message)

pytestmark = pytest.mark.usefixtures("task_identity")

OVERRIDES = f"{FAST} privacy.epsilon=8 rounds=2 train.epochs=0.5"  # a few steps over 100 slots
RECORDS, N = 100, 60
SENTINEL = "SENTINEL-7f3a"


def extra_record(label: str = "bad") -> pd.DataFrame:
    return pd.DataFrame({"text": [f"{SENTINEL} applicant, age 40"], "label": [label]})


def sampled_slots(key: bytes, state: dict[str, torch.Tensor], server_round: int = 1) -> set[int]:
    """The slots the client's first attempt will draw in this round (replays train_local's draws)."""
    cfg = load_config(run_config(OVERRIDES))
    q = min(1.0, int(cfg.train.batch_size) / RECORDS)
    steps = max(1, round(float(cfg.train.epochs) / q))
    sampling, _ = round_generators(StreamKey(institution_secret(key, STUDY), server_round, state_digest(state), 1),
                                   torch.device("cpu"))
    hits: set[int] = set()
    for _ in range(steps):
        hits |= set((torch.rand(RECORDS, generator=sampling) < q).nonzero().squeeze(1).tolist())
    return hits


def key_where(state, sampled: bool) -> bytes:
    """A noise key whose first attempt does (or does not) draw slot N, the added record's slot."""
    while True:
        key = secrets.token_bytes(32)
        if (N in sampled_slots(key, state)) == sampled:
            return key


def short_records(n: int) -> pd.DataFrame:
    """Records far shorter than train.max_length, so a long added record would widen a batch."""
    return pd.DataFrame({"text": [f"applicant {i}" for i in range(n)], "label": ["good", "bad"] * (n // 2)})


def reply_on(tmp_path, name: str, key: bytes, state, extra: pd.DataFrame | None, shapes: list | None = None,
             base: pd.DataFrame | None = None):
    """The reply of an institution holding D (+ extra), with the given noise key."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "state").mkdir()
    (folder / "state" / "noise.key").write_bytes(key)
    if base is None:
        csv = bank_file(folder / "bank.csv", N, extra=extra)
    else:
        csv = folder / "bank.csv"
        pd.concat([base, extra], ignore_index=True).to_csv(csv, index=False)
    node = institution_config(csv, folder / "state", records=RECORDS)
    context = make_context(OVERRIDES, node)
    handle = None
    if shapes is not None:  # the model this node trains (its config has the node's pinned labels)
        model = cached_model(apply_node_config(load_config(run_config(OVERRIDES)), node)[0])
        handle = model.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        return app(train_message(state, 1, study=STUDY), context)
    finally:
        if handle is not None:
            handle.remove()


def transcript(reply) -> bytes:
    """Everything the server receives except the tensor values: serialized, so nothing is missed."""
    if reply.has_error():
        return f"error {reply.error.code} {reply.error.reason}".encode()
    content = reply.content
    shapes = {k: (tuple(a.shape), a.dtype) for k, a in content["arrays"].items()}
    rest = {k: v for k, v in content.items() if k != "arrays"}
    from flwr.app import RecordDict

    return repr(shapes).encode() + recorddict_to_proto(RecordDict(rest)).SerializeToString()


@pytest.mark.parametrize("extra", [extra_record("bad"), extra_record("good"), extra_record(SENTINEL)],
                         ids=["bad", "good", "unknown-label"])
def test_d_and_d_plus_one_unsampled_record_give_the_server_identical_replies(tmp_path, extra):
    state = global_adapter(OVERRIDES)
    key = key_where(state, sampled=False)
    d = reply_on(tmp_path, "d", key, state, None)
    d1 = reply_on(tmp_path, "d1", key, state, extra)
    ok_metrics(d)
    assert transcript(d) == transcript(d1)
    assert all(torch.equal(arrays_of(d)[k], arrays_of(d1)[k]) for k in state), "an unsampled record moved the update"


def test_a_sampled_record_changes_only_the_adapter_and_never_the_compute_shapes(tmp_path):
    state = global_adapter(OVERRIDES)
    key = key_where(state, sampled=True)
    shapes_d, shapes_d1 = [], []
    long_record = pd.DataFrame({"text": [f"{SENTINEL} " + "a very long application text " * 20], "label": ["bad"]})
    d = reply_on(tmp_path, "d", key, state, None, shapes_d, base=short_records(N))
    d1 = reply_on(tmp_path, "d1", key, state, long_record, shapes_d1, base=short_records(N))
    assert transcript(d) == transcript(d1)
    assert shapes_d == shapes_d1 and shapes_d, "batch shapes (the reply's timing) depend on the data"
    assert any(not torch.equal(arrays_of(d)[k], arrays_of(d1)[k]) for k in state), \
        "the sampled record had no effect: this test could not see a leak through the adapter"
    assert SENTINEL.encode() not in transcript(d1)


@pytest.mark.parametrize("node, run", [
    ({}, "data.label_column=text"),                      # the server remaps a pinned column
    ({}, "data.labels=[good,SENTINEL]"),                  # the server asks for other labels
    ({"records": 10}, ""),                                # more records than declared
    ({"data-path": "/nonexistent/bank.csv"}, ""),         # the file is gone
    ({}, "privacy=none"),                                 # no DP, and the node does not allow it
])
def test_every_refusal_is_a_code_with_a_fixed_text(tmp_path, node, run):
    csv = bank_file(tmp_path / "bank.csv", N, extra=extra_record(SENTINEL))
    overrides = f"{OVERRIDES} {run}"
    context = make_context(overrides, {**institution_config(csv, tmp_path / "state", records=RECORDS), **node})
    reply = app(train_message(global_adapter(OVERRIDES), 1, study=STUDY), context)
    assert reply.has_error(), "expected a refusal"
    assert reply.error.reason == REFUSAL_TEXT[Refusal(reply.error.code)]
    assert SENTINEL not in reply.error.reason and str(csv) not in reply.error.reason


def test_a_schema_problem_of_the_file_is_refused_without_its_columns(tmp_path):
    csv = tmp_path / "bank.csv"
    pd.DataFrame({f"{SENTINEL}-column": ["x"], "label": ["good"]}).to_csv(csv, index=False)
    context = make_context(OVERRIDES, institution_config(csv, tmp_path / "state"))
    reply = app(train_message(global_adapter(OVERRIDES), 1, study=STUDY), context)
    assert reply.has_error() and reply.error.code == Refusal.DATA
    assert reply.error.reason == REFUSAL_TEXT[Refusal.DATA]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_a_non_finite_or_absurd_global_adapter_is_refused_before_training(tmp_path, poison, monkeypatch):
    called = []
    monkeypatch.setattr(client_round, "train_local", lambda *a, **k: called.append(1))
    state = global_adapter(OVERRIDES)
    name = next(k for k in state if "classifier" in k)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = poison
    csv = bank_file(tmp_path / "bank.csv", N)
    reply = app(train_message(state, 1, study=STUDY), make_context(OVERRIDES, institution_config(csv, tmp_path / "s")))
    assert reply.has_error() and reply.error.code == Refusal.INPUT and called == []


def test_an_overflowing_head_yields_a_finite_release(tmp_path, monkeypatch):
    """Past the range check (lifted here), records whose loss overflows add zero, never NaN."""
    monkeypatch.setattr(client_round, "MAX_GLOBAL_ABS", float("inf"))
    state = global_adapter(OVERRIDES)
    for name in state:
        if "classifier" in name and name.endswith("weight"):
            state[name] = torch.full_like(state[name], 3e38) * torch.tensor([[1.0], [-1.0]])
    csv = bank_file(tmp_path / "bank.csv", N)
    reply = app(train_message(state, 1, study=STUDY), make_context(OVERRIDES, institution_config(csv, tmp_path / "s")))
    ok_metrics(reply)
    assert all(bool(torch.isfinite(t).all()) for t in arrays_of(reply).values())


def _update(reply, sent) -> np.ndarray:
    got = arrays_of(reply)
    return torch.cat([(got[k] - sent[k]).flatten() for k in sent]).numpy()


def test_a_round_trained_again_on_another_adapter_draws_fresh_noise(tmp_path):
    overrides = f"{FAST} privacy.noise_multiplier=1000 rounds=2 train.optimizer=sgd"
    csv = bank_file(tmp_path / "bank.csv", N)
    node = institution_config(csv, tmp_path / "s", records=RECORDS)
    first = global_adapter(overrides)
    second = {k: v + 1e-3 for k, v in first.items()}
    u1 = _update(app(train_message(first, 1, study=STUDY), make_context(overrides, node)), first)
    u2 = _update(app(train_message(second, 1, study=STUDY), make_context(overrides, node)), second)
    # With the noise drawn again (the earlier bug) the two updates are the same noise: corr ~ 1.
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.1
    # The test can see reuse: the same key and attempt in a fresh state dir reproduce u1 exactly.
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "noise.key").write_bytes((tmp_path / "s" / "noise.key").read_bytes())
    again = _update(app(train_message(first, 1, study=STUDY),
                        make_context(overrides, institution_config(csv, twin, records=RECORDS))), first)
    assert np.corrcoef(u1, again)[0, 1] > 0.999


def test_secagg_replies_carry_only_public_metadata(tmp_path):
    overrides = f"{OVERRIDES} secagg=true"
    state = global_adapter(overrides)
    keys = list(state)
    fitins = FitIns(ndarrays_to_parameters([state[k].numpy() for k in keys]),
                    {SECAGG_KEYS: "\n".join(keys), "server-round": 1, "study-id": STUDY})
    csv = bank_file(tmp_path / "bank.csv", N)
    context = make_context(overrides, institution_config(csv, tmp_path / "s", records=RECORDS))
    from flwr.app import Message, MessageType

    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=11,
                  message_type=MessageType.TRAIN)
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert set(fitres.metrics) <= set(METRICS) and fitres.num_examples == RECORDS


def test_the_allowlist_refuses_an_unlisted_metric():
    assert metrics({"epsilon": 1.0}) == {"epsilon": 1.0}
    with pytest.raises(KeyError, match="train-loss"):
        metrics({"epsilon": 1.0, "train-loss": 0.7})


def test_attacks_are_simulation_only(tmp_path):
    """A node with its own data never runs the attack code, whatever the run config says."""
    overrides = f"{OVERRIDES} attack.fraction=0.5 attack.kind=non-finite"
    csv = bank_file(tmp_path / "bank.csv", N)
    node = {**institution_config(csv, tmp_path / "s", records=RECORDS), "partition-id": 0, "num-partitions": 2}
    reply = app(train_message(global_adapter(overrides), 1, study=STUDY), make_context(overrides, node))
    assert all(bool(torch.isfinite(t).all()) for t in arrays_of(reply).values())
    simulated = app(train_message(global_adapter(overrides), 1), make_context(overrides, {"partition-id": 0,
                                                                                          "num-partitions": 2}))
    assert not all(bool(torch.isfinite(t).all()) for t in arrays_of(simulated).values())
