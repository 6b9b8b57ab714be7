"""The linear-probe round through the real ClientApp, as the server (the adversary) sees it:
the feature-mean release is on the ledger at exactly the accountant's price, charged once per
study and data version; D and D + 1 give the same transcript; the features and the mean stay home."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fed_dp_lora.client_app import app
from fed_dp_lora.client_data import cached_model
from fed_dp_lora.config import load_config
from fed_dp_lora.node_policy import apply_node_config
from fed_dp_lora.privacy.accountant import PrivacyLedger
from fed_dp_lora.privacy.institution_ledger import FEATURE_MEAN, InstitutionLedger
from fed_dp_lora.probe.features import cached_features
from tests.client_helpers import (STUDY, arrays_of, bank_file, global_adapter, institution_config, ledger_of,
                                  make_context, ok_metrics, run_config, train_message)
from tests.test_reply import SENTINEL, extra_record, transcript

pytestmark = pytest.mark.usefixtures("task_identity")

PROBE = "+preset=tiny recipe=linear-probe train.batch_size=16 train.epochs=0.5 privacy.epsilon=8 rounds=2"
RECORDS, N = 100, 60
CENTRE_SIGMA = 10.0  # conf/config.yaml probe.center_noise_multiplier


def _round(tmp_path, csv, state, server_round=1, key: bytes | None = None, overrides: str = PROBE):
    node = institution_config(csv, tmp_path / "state", records=RECORDS)
    if key is not None:
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / "noise.key").write_bytes(key)
    context = make_context(overrides, node)
    return app(train_message(state, server_round, study=STUDY), context), context


def test_the_feature_mean_is_on_the_ledger_at_exactly_the_accountants_price(tmp_path):
    state = global_adapter(PROBE)
    csv = bank_file(tmp_path / "bank.csv", N)
    reply, context = _round(tmp_path, csv, state)
    m = ok_metrics(reply)
    mechanism = (m["noise-multiplier"], m["sample-rate"], int(m["steps"]))
    with_mean = PrivacyLedger("rdp", m["delta"], [(CENTRE_SIGMA, 1.0, 1), mechanism]).epsilon()
    without = PrivacyLedger("rdp", m["delta"], [mechanism]).epsilon()
    assert m["epsilon"] == pytest.approx(with_mean, rel=1e-12) and m["epsilon"] > without + 1e-6
    ledger = InstitutionLedger.from_dict(ledger_of(context))
    assert [r.kind for r in ledger.releases] == [FEATURE_MEAN, "dp-sgd"]
    # Round 2 reuses the kept mean: no second charge, and the planned study fits its budget.
    second, context = _round(tmp_path, csv, arrays_of(reply), server_round=2)
    m2 = ok_metrics(second)
    assert m2["epsilon"] == pytest.approx(
        PrivacyLedger("rdp", m["delta"], [(CENTRE_SIGMA, 1.0, 1), mechanism, mechanism]).epsilon(), rel=1e-12)
    assert 7.5 < m2["epsilon"] <= 8.0
    assert [r.kind for r in InstitutionLedger.from_dict(ledger_of(context)).releases].count(FEATURE_MEAN) == 1


def test_a_changed_file_is_a_new_mean_and_a_new_charge(tmp_path):
    fixed = f"{PROBE} privacy.noise_multiplier=2.0"  # room in the budget for the second charge
    csv = bank_file(tmp_path / "bank.csv", N)
    reply, _ = _round(tmp_path, csv, global_adapter(PROBE), overrides=fixed)
    bank_file(csv, N, extra=extra_record("good"))  # the institution's file changed between rounds
    second, context = _round(tmp_path, csv, arrays_of(reply), server_round=2, overrides=fixed)
    ok_metrics(second)
    kinds = [r.kind for r in InstitutionLedger.from_dict(ledger_of(context)).releases]
    assert kinds == [FEATURE_MEAN, "dp-sgd", FEATURE_MEAN, "dp-sgd"]


@pytest.mark.parametrize("extra", [extra_record("bad"), extra_record(SENTINEL)], ids=["bad", "unknown-label"])
def test_d_and_d_plus_one_give_the_same_transcript_and_compute_shapes(tmp_path, extra):
    """Every record is in the mean (its accounted release), so the head may differ; nothing else may."""
    state = global_adapter(PROBE)
    model = cached_model(apply_node_config(load_config(run_config(PROBE)),
                                           institution_config(tmp_path / "x.csv", tmp_path / "x"))[0])
    replies, shapes = [], []
    for name, added in (("d", None), ("d1", extra)):
        folder = tmp_path / name
        folder.mkdir()
        seen: list = []
        handle = model.encoder.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        try:
            replies.append(_round(folder, bank_file(folder / "bank.csv", N, extra=added), state, key=b"k" * 32)[0])
        finally:
            handle.remove()
        shapes.append(seen)
    ok_metrics(replies[0])
    assert transcript(replies[0]) == transcript(replies[1])
    assert shapes[0] == shapes[1] and shapes[0], "the one-off feature pass' shapes depend on the data"
    assert SENTINEL.encode() not in transcript(replies[1])


def test_features_and_the_mean_stay_in_the_state_dir_and_only_the_head_is_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_DP_LORA_CACHE", str(tmp_path / "user-cache"))
    csv = bank_file(tmp_path / "bank.csv", N)
    state = global_adapter(PROBE)
    reply, _ = _round(tmp_path, csv, state)
    sent = arrays_of(reply)
    assert set(sent) == set(state) == {"classifier.weight", "classifier.bias"}
    assert all(sent[k].shape == state[k].shape for k in state)
    stored = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert any(n.startswith("features-") for n in stored) and any(n.startswith("feature-mean-") for n in stored)
    assert not (tmp_path / "user-cache" / "features").exists(), "an institution's features left its state dir"
    # The kept mean is the noisy release, not the records' mean.
    model = cached_model(apply_node_config(load_config(run_config(PROBE)),
                                           institution_config(csv, tmp_path / "state"))[0])
    from fed_dp_lora.client_data import client_data
    from fed_dp_lora.node_policy import apply_node_config as apply

    cfg, policy = apply(load_config(run_config(PROBE)), institution_config(csv, tmp_path / "state", records=RECORDS))
    data = client_data(cfg, policy).encoded
    features = model.joined(cached_features(model, data, tmp_path / "state"), data.columns)
    kept = torch.load(next((tmp_path / "state").glob("feature-mean-*.pt")), weights_only=True)["mean"]
    text, columns = features.split([384, features.shape[1] - 384], dim=1)  # credit's head reads both
    clipped = torch.cat([text * (4.5 / text.norm(dim=1, keepdim=True)).clamp(max=1.0),
                         columns * (4.0 / columns.norm(dim=1, keepdim=True)).clamp(max=1.0)], dim=1)
    gap = (kept - clipped.sum(0) / RECORDS) * RECORDS / (CENTRE_SIGMA * (4.5**2 + 4.0**2) ** 0.5)
    assert 0.7 < float(gap.std()) < 1.3, "the kept mean is not the Gaussian-mechanism release"


def test_the_head_trains_on_centred_features_so_a_common_offset_changes_nothing(monkeypatch):
    """Without DP the centre is the exact mean: shifting every feature by one vector must leave the
    logits of the head sent unchanged (a head trained on uncentred features would move)."""
    from fed_dp_lora import client_round
    from fed_dp_lora.client_round import RoundRequest, train_round

    overrides = "+preset=tiny recipe=linear-probe privacy=none privacy.seeded_noise=true train.epochs=2"
    cfg = load_config(run_config(overrides))
    node = {"partition-id": 0, "num-partitions": 20}
    real = client_round.client_features
    heads, state = {}, global_adapter(overrides)
    width = state["classifier.weight"].shape[1]  # the text's features and credit's columns
    offset = torch.randn(width) * 5
    seen = []
    for shift in (0.0, 1.0):
        monkeypatch.setattr(client_round, "client_features",
                            lambda *a, s=shift: seen.append(real(*a)) or seen[-1] + s * offset)
        heads[shift] = train_round(cfg, node, RoundRequest(state), None).state
    # The client's own records: a column constant over them (a missing flag never set) is centred to
    # exactly zero unshifted but to rounding error shifted, which Adam's per-coordinate scaling
    # turns into steps; on the records that column is constant, so their logits must still agree.
    x = seen[0]
    logits = {s: x @ h["classifier.weight"].T + h["classifier.bias"] for s, h in heads.items()}
    shifted = (x + offset) @ heads[1.0]["classifier.weight"].T + heads[1.0]["classifier.bias"]
    assert torch.allclose(logits[0.0], shifted, atol=1e-3)
    assert not torch.allclose(heads[0.0]["classifier.bias"], heads[1.0]["classifier.bias"], atol=1e-3)
