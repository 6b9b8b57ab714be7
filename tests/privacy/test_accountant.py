"""The per-client privacy ledger against independent accountants.

References: a single Opacus accountant stepped over the whole run (composition across rounds
and processes), and Google's ``dp_accounting`` (RDP and PLD), an implementation independent of
Opacus.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from opacus.accountants import PRVAccountant, RDPAccountant

from fed_dp_lora.privacy.accountant import BudgetExceeded, PrivacyLedger, calibrate_noise

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def _through_context_state(ledger: PrivacyLedger) -> PrivacyLedger:
    """What the next round's (new) process sees: ConfigRecord -> protobuf -> ConfigRecord."""
    proto = config_record_to_proto(ConfigRecord(ledger.to_dict())).SerializeToString()
    message = type(config_record_to_proto(ConfigRecord({})))()
    message.ParseFromString(proto)
    return PrivacyLedger.from_dict(dict(config_record_from_proto(message)))


def _dp_event(history: list[tuple[float, float, int]]) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )


@functools.lru_cache(maxsize=None)
def _calibrated(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return calibrate_noise(epsilon, delta, q, steps, accountant)


# ---------------------------------------------------------------------------------------------
# 1. Composition over rounds through the serialized ledger
# ---------------------------------------------------------------------------------------------

ROUNDS = {
    # one (sigma, q, steps) per round, as the client app records it
    "same-every-round": [(1.5, 0.02, 100)] * 3,
    "changing": [(1.5, 0.02, 100), (2.0, 0.1, 7), (1.1, 0.02, 40)],
}


@pytest.mark.parametrize(
    ("rounds", "accountant"),
    [("same-every-round", "rdp"), ("changing", "rdp"), ("changing", "prv")],
)
def test_epsilon_composes_over_serialized_rounds(accountant, rounds):
    delta = 1e-5
    state = None  # context.state of the client: empty before its first round
    per_round_epsilon = []
    for sigma, q, steps in ROUNDS[rounds]:
        ledger = _through_context_state(state) if state else PrivacyLedger(accountant, delta)
        ledger.record(sigma, q, steps)
        per_round_epsilon.append(ledger.epsilon())
        state = ledger
    final = _through_context_state(state)

    # Reference: one Opacus accountant that lived through every step of the run.
    reference = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for sigma, q, steps in ROUNDS[rounds]:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
    expected = reference.get_epsilon(delta=delta)

    assert final.epsilon() == pytest.approx(expected, rel=1e-9)
    assert final.steps == sum(s for _, _, s in ROUNDS[rounds])
    assert final.delta == delta and final.accountant == accountant
    # Epsilon grows every round: nothing resets when a new process picks the ledger up.
    assert all(b > a for a, b in zip(per_round_epsilon, per_round_epsilon[1:]))


# ---------------------------------------------------------------------------------------------
# 2. Agreement with Google's dp_accounting
# ---------------------------------------------------------------------------------------------

SETTINGS = [
    # (history, delta)
    ([(1.0, 0.01, 1000)], 1e-5),
    ([(0.8, 0.05, 200)], 1e-4),
    ([(2.0, 0.1, 50)], 1e-5),
    ([(1.1, 0.02, 300), (0.9, 0.04, 120), (1.5, 0.02, 500)], 2.5e-5),  # multi-round history
]
SETTING_IDS = ["s1.0-q.01", "s0.8-q.05", "s2.0-q.1", "three-rounds"]


@pytest.mark.parametrize(("history", "delta"), SETTINGS, ids=SETTING_IDS)
def test_rdp_epsilon_matches_dp_accounting_rdp(history, delta):
    ledger = PrivacyLedger("rdp", delta, list(history))
    reference = RdpAccountant()  # its own default orders, its own RDP code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.compose(_dp_event(history))
    expected = reference.get_epsilon(delta)
    assert ledger.epsilon() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(("history", "delta"), SETTINGS, ids=SETTING_IDS)
def test_prv_epsilon_matches_dp_accounting_pld(history, delta):
    # Both are tight numerical accountants. Opacus' PRV returns an upper bound with an
    # epsilon error of 0.01, dp_accounting's PLD (pessimistic discretization 1e-3) is an upper
    # bound too; measured gaps are below 0.7%, so 2% is an honest tolerance.
    ledger = PrivacyLedger("prv", delta, list(history))
    reference = PLDAccountant(value_discretization_interval=1e-3)
    reference.compose(_dp_event(history))
    expected = reference.get_epsilon(delta)
    assert ledger.epsilon() == pytest.approx(expected, rel=0.02)


# ---------------------------------------------------------------------------------------------
# 3. Noise calibration
# ---------------------------------------------------------------------------------------------

CALIBRATIONS = [
    # (epsilon, delta, q, steps, accountant)
    (8.0, 1e-4, 0.05, 80, "rdp"),
    (1.0, 1e-5, 0.02, 150, "rdp"),
    (1.0, 1e-5, 0.02, 150, "prv"),
]


@pytest.mark.parametrize(("epsilon", "delta", "q", "steps", "accountant"), CALIBRATIONS)
def test_calibrated_noise_is_the_smallest_within_target(epsilon, delta, q, steps, accountant):
    sigma = _calibrated(epsilon, delta, q, steps, accountant)
    achieved = PrivacyLedger(accountant, delta, [(sigma, q, steps)]).epsilon()
    assert achieved <= epsilon
    assert achieved >= 0.98 * epsilon  # not wastefully noisy
    smaller = PrivacyLedger(accountant, delta, [(0.99 * sigma, q, steps)]).epsilon()
    assert smaller > epsilon
    # Independent check of the calibrated sigma with dp_accounting's own accountant.
    if accountant == "rdp":
        reference = RdpAccountant()
    else:
        reference = PLDAccountant(value_discretization_interval=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.compose(_dp_event([(sigma, q, steps)]))
    assert reference.get_epsilon(delta) == pytest.approx(epsilon, rel=0.03)


# ---------------------------------------------------------------------------------------------
# 4. Budget refusal
# ---------------------------------------------------------------------------------------------


def test_check_budget_refuses_and_records_nothing():
    ledger = PrivacyLedger("rdp", 1e-5, [(1.5, 0.02, 100)])
    before = ledger.to_dict()
    spent = ledger.epsilon()
    planned = (1.1, 0.02, 40)
    after = ledger.epsilon(planned)
    budget = (spent + after) / 2  # the planned round would cross it
    with pytest.raises(BudgetExceeded) as err:
        ledger.check_budget(planned, budget)
    message = str(err.value)
    assert f"{after:.3f}" in message  # the epsilon it would reach
    assert re.search(rf"budget {budget:g}\b", message)
    assert f"{spent:.3f}" in message and "100 steps" in message  # what was spent so far
    assert ledger.to_dict() == before  # nothing recorded, nothing spent
    # Within the budget the same call returns the epsilon after the planned round.
    assert ledger.check_budget(planned, after * 1.01) == pytest.approx(after, rel=1e-12)
    assert ledger.check_budget(planned, None) == pytest.approx(after, rel=1e-12)
    assert ledger.to_dict() == before


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_plan_allows_exactly_its_rounds(accountant):
    epsilon, delta, q, steps_per_round, rounds = 1.0, 1e-5, 0.02, 50, 3
    sigma = _calibrated(epsilon, delta, q, steps_per_round * rounds, accountant)
    ledger = PrivacyLedger(accountant, delta)
    for _ in range(rounds):
        ledger = _through_context_state(ledger)
        ledger.check_budget((sigma, q, steps_per_round), epsilon)  # must not raise
        ledger.record(sigma, q, steps_per_round)
    assert ledger.epsilon() <= epsilon
    ledger = _through_context_state(ledger)
    with pytest.raises(BudgetExceeded):
        ledger.check_budget((sigma, q, steps_per_round), epsilon)
    assert ledger.steps == steps_per_round * rounds


# ---------------------------------------------------------------------------------------------
# 5. Edge cases
# ---------------------------------------------------------------------------------------------


def test_empty_history_and_step_sum():
    ledger = PrivacyLedger("rdp", 1e-5)
    assert ledger.epsilon() == 0.0
    assert ledger.steps == 0
    assert ledger.epsilon((1.0, 0.1, 0)) == 0.0  # a planned round without steps spends nothing
    ledger.record(1.0, 0.1, 0)  # a round that took no step is not recorded
    assert ledger.history == [] and ledger.epsilon() == 0.0
    ledger.record(2.0, 0.1, 7)
    ledger.record(3.0, 0.1, 11)
    ledger.record(2.0, 0.1, 7)
    assert ledger.steps == 25
    assert ledger.epsilon() > 0.0
    assert ledger.epsilon() == pytest.approx(
        PrivacyLedger("rdp", 1e-5, [(2.0, 0.1, 14), (3.0, 0.1, 11)]).epsilon(), rel=1e-9
    )
