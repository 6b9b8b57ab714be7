"""The institution's lifetime ledger: studies compose, calibration spends only what is left."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fed_dp_lora.privacy.accountant import BudgetExceeded, PrivacyLedger, calibrate_noise
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Request

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def request(study: str, **kw) -> Request:
    base = dict(study=study, delta=1e-5, accountant="rdp", noise=None, rate=0.05, steps=20, rounds=3,
                study_budget=8.0, lifetime_budget=None, lifetime_delta=1e-5)
    return Request(**{**base, **kw})


def run_study(ledger: InstitutionLedger, study: str, rounds: int = 3, **kw) -> list[float]:
    spent = []
    for r in range(1, rounds + 1):
        plan = ledger.plan(request(study, rounds=rounds, **kw))
        ledger.record(plan, r, plan.request.steps)
        spent.append(ledger.study(study).epsilon())
    return spent


def reference_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                                                 steps))
    return acc.get_epsilon(delta)


def test_a_planned_study_spends_its_budget_and_the_lifetime_composes_every_study():
    ledger = InstitutionLedger()
    first = run_study(ledger, "s1")
    assert 7.9 < first[-1] <= 8.0 * (1 + 1e-9)
    second = run_study(ledger, "s2", noise=2.0)
    history = [(r.noise, r.rate, r.steps) for r in ledger.releases]
    assert ledger.lifetime(1e-5).epsilon() == pytest.approx(reference_epsilon(history, 1e-5), rel=0.02)
    assert ledger.lifetime(1e-5).epsilon() > max(first[-1], second[-1])
    assert ledger.study("s2").epsilon() == pytest.approx(reference_epsilon(history[3:], 1e-5), rel=0.02)


def test_calibration_with_history_uses_exactly_what_is_left():
    history = ((1.0, 0.05, 60),)
    sigma = calibrate_noise(10.0, 1e-5, 0.05, 60, "rdp", history)
    ledger = PrivacyLedger("rdp", 1e-5, list(history))
    assert ledger.epsilon((sigma, 0.05, 60)) <= 10.0
    assert ledger.epsilon((0.98 * sigma, 0.05, 60)) > 10.0
    with pytest.raises(BudgetExceeded, match="already spent"):
        calibrate_noise(ledger.epsilon(), 1e-5, 0.05, 60, "rdp", history)


def test_a_new_study_gets_only_what_is_left_of_the_lifetime_budget():
    ledger = InstitutionLedger()
    run_study(ledger, "s1", lifetime_budget=10.0)
    spent = ledger.lifetime(1e-5).epsilon()
    plan = ledger.plan(request("s2", lifetime_budget=10.0))
    assert plan.terms.noise > ledger.studies["s1"].noise  # less left, more noise
    run_study(ledger, "s2", lifetime_budget=10.0)
    assert spent < ledger.lifetime(1e-5).epsilon() <= 10.0 * (1 + 1e-9)


def test_budgets_are_checked_before_the_round():
    ledger = InstitutionLedger()
    run_study(ledger, "s1", rounds=2, study_budget=4.0)
    with pytest.raises(BudgetExceeded, match="this study's budget 4"):
        ledger.plan(request("s1", rounds=2, study_budget=4.0))
    with pytest.raises(BudgetExceeded, match="of epsilon 1 is already spent"):
        ledger.plan(request("s9", noise=1.0, study_budget=None, lifetime_budget=1.0))


def test_a_study_keeps_its_terms_and_refuses_a_changed_delta():
    ledger = InstitutionLedger()
    run_study(ledger, "s1", rounds=1)
    assert ledger.plan(request("s1", rate=0.1, study_budget=None)).terms == ledger.studies["s1"]
    with pytest.raises(BudgetExceeded, match="keep privacy settings fixed"):
        ledger.plan(request("s1", delta=1e-6))


def test_the_ledger_survives_context_state_serialization():
    ledger = InstitutionLedger()
    run_study(ledger, "s1", rounds=2)
    run_study(ledger, "s2", rounds=1, noise=3.0)
    proto = config_record_to_proto(ConfigRecord(ledger.to_dict())).SerializeToString()
    message = type(config_record_to_proto(ConfigRecord({})))()
    message.ParseFromString(proto)
    assert InstitutionLedger.from_dict(dict(config_record_from_proto(message))) == ledger
    assert InstitutionLedger.from_dict(InstitutionLedger().to_dict()) == InstitutionLedger()
