"""The auditor's scoring of one client's releases, on synthetic releases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from fed_dp_lora.audit.release import ReleaseAudit
from fed_dp_lora.config import ConfigError
from fed_dp_lora.audit.bounds import epsilon_lower_bound

ADAPTER = {"layer.lora_A": torch.zeros(8, 64), "layer.lora_B": torch.zeros(64, 8), "head": torch.zeros(2, 16)}


@pytest.fixture
def auditor(make_cfg) -> ReleaseAudit:
    cfg = make_cfg("audit.release.enabled=true", "audit.release.canaries=300", "audit.release.guesses=60",
                   "audit.release.client=1")
    return ReleaseAudit(cfg, ADAPTER)


def _release(auditor: ReleaseAudit, step: float, seed: int = 0) -> ArrayRecord:
    """The global adapter moved by `step` along every included canary's descent, plus noise."""
    c = auditor.canaries
    rng = np.random.default_rng(seed)
    state = {n: rng.normal(0.0, 0.01, t.shape).astype(np.float32) for n, t in ADAPTER.items()}
    for i, name in enumerate(c.names):
        mine = (c.tensor == i) & c.included
        state[name].reshape(-1)[c.offset[mine]] -= step * c.sign[mine]
    return ArrayRecord({n: torch.from_numpy(a) for n, a in state.items()})


def _metrics(partition: int, epsilon: float | None = 2.0) -> MetricRecord:
    privacy = {"epsilon": epsilon, "delta": 1e-5} if epsilon is not None else {}
    return MetricRecord({"partition-id": partition, "num-examples": 100, **privacy})


def test_a_release_that_moves_every_included_canary_is_caught_at_the_ceiling(auditor):
    reference = ArrayRecord(ADAPTER)
    auditor.observe(1, _metrics(0), _release(auditor, 1.0), reference)  # another client: ignored
    assert auditor.rounds == []
    auditor.observe(1, _metrics(1), _release(auditor, 1.0), reference)
    result = auditor.result()
    assert result["client"] == "client-1" and result["canaries"] == 300 and result["guesses"] == 60
    assert result["correct"] == 60
    assert result["epsilon_lower"] == result["ceiling"] == epsilon_lower_bound(300, 60, 60, 1e-5)
    assert result["claimed_epsilon"] == 2.0 and result["delta"] == 1e-5
    assert result["included"] == int(auditor.canaries.included.sum())
    assert [r["round"] for r in result["rounds"]] == [1]
    assert "60 of 60 guesses right over 1 release(s) (claimed: 2.0)" in auditor.progress_line()


def test_an_audited_client_that_never_replied_is_reported(auditor):
    auditor.observe(1, _metrics(0), _release(auditor, 1.0), ArrayRecord(ADAPTER))
    assert auditor.result()["rounds"] == [] and auditor.result()["epsilon_lower"] == 0.0
    assert "client-1 sent no accepted update" in auditor.progress_line()


def test_a_release_that_ignores_the_canaries_shows_nothing(auditor):
    auditor.observe(1, _metrics(1), _release(auditor, 0.0), ArrayRecord(ADAPTER))
    result = auditor.result()
    assert result["epsilon_lower"] == 0.0 and 15 < result["correct"] < 45


def test_scores_add_up_over_rounds_against_the_adapter_each_round_started_from(auditor):
    """Weak movement per round, accumulated; a global adapter that already moved is subtracted."""
    first, second = _release(auditor, 0.004, seed=1), _release(auditor, 0.004, seed=2)
    auditor.observe(1, _metrics(1, 1.0), first, ArrayRecord(ADAPTER))
    moved = {n: first[n].numpy() for n in ADAPTER}
    shifted = {n: torch.from_numpy(moved[n] + second[n].numpy()) for n in ADAPTER}
    auditor.observe(2, _metrics(1, 1.5), ArrayRecord(shifted), ArrayRecord({n: torch.from_numpy(moved[n])
                                                                             for n in ADAPTER}))
    one, two = auditor.rounds
    assert (one["claimed_epsilon"], two["claimed_epsilon"]) == (1.0, 1.5)
    assert two["correct"] > one["correct"]
    saved = auditor.state_dict()
    auditor.scores[:] = 0
    auditor.load_state_dict(saved)
    assert auditor.result()["rounds"] == [one, two] and np.array_equal(auditor.scores, saved["scores"])


def test_without_privacy_the_claim_is_none_and_delta_zero(auditor):
    auditor.observe(1, _metrics(1, None), _release(auditor, 1.0), ArrayRecord(ADAPTER))
    result = auditor.result()
    assert result["claimed_epsilon"] is None and result["delta"] == 0.0
    assert result["epsilon_lower"] == epsilon_lower_bound(300, 60, 60, 0.0)


def test_more_canaries_than_coordinates_is_a_config_error(make_cfg):
    cfg = make_cfg("audit.release.enabled=true", "audit.release.canaries=2000", "audit.release.guesses=60")
    with pytest.raises(ConfigError, match="audit.release.canaries"):
        ReleaseAudit(cfg, ADAPTER)
