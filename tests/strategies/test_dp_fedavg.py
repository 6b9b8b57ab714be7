"""DP-FedAvg in process: clipping, the noise std, the fixed denominator, adaptive clipping,
the user-level accountant against Google's dp_accounting, budget stops and summary.json."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from fed_dp_lora.config import ConfigError, to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid, run_federation
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from tests.strategies.helpers import filled, reply_with, run_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = {"layer.lora_A": torch.zeros(2, 4), "layer.lora_B": torch.zeros(4, 2), "head": torch.zeros(3)}
NUMEL = sum(v.numel() for v in REFERENCE.values())
QUIET = "strategy.noise_multiplier=1e-9"  # noise negligible next to the values checked


def dp_strategy(tmp_path, make_cfg, *overrides):
    cfg = make_cfg("strategy=dp-fedavg", *overrides)
    report = RunReport(tmp_path, to_plain(cfg))
    return build_strategy(cfg), report


def test_each_update_is_clipped_to_c_and_the_sum_divided_by_the_sample_size(tmp_path, make_cfg):
    # Client 1's update has norm 10 * sqrt(NUMEL) (clipped to 1), client 2's norm is 0.01 * sqrt(NUMEL)
    # (kept); a NaN client is rejected and counts zero; the denominator stays 3 (sampled).
    nan = filled(REFERENCE, 1.0)
    nan["head"][0] = float("nan")
    grid = InProcessGrid({1: reply_with(filled(REFERENCE, 10.0), 5), 2: reply_with(filled(REFERENCE, 0.01), 500),
                          3: reply_with(nan, 50)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.clip_norm=1.0", QUIET)
    got = run_strategy(strat, grid, REFERENCE, report).arrays.to_torch_state_dict()

    clipped_1 = 1.0 / math.sqrt(NUMEL)  # every coordinate of 10 * ones / ||10 * ones||
    want = (clipped_1 + 0.01) / 3  # equal weights: the record counts (5, 500) play no part
    for key, value in got.items():
        assert torch.allclose(value.double(), torch.full_like(value, want).double(), atol=1e-7), key
    info = report.rounds[0]["strategy"]
    assert info["denominator"] == 3 and info["sampled"] == 3 and info["aggregated"] == 2
    assert info["clip_norm"] == 1.0
    assert set(report.rounds[0]["failures"]) == {"node-3"}


@pytest.mark.parametrize(
    "overrides, denominator",
    [
        ([], 4.0),  # fraction_train=1 of N=4: fixed sample size 4
        (["strategy.sampling=poisson", "strategy.sample_rate=0.5"], 2.0),  # q N = 0.5 * 4
    ],
)
def test_noise_std_is_z_c_over_the_fixed_denominator(tmp_path, make_cfg, overrides, denominator):
    big = {"lora": torch.zeros(200, 100)}  # 20000 coordinates to measure a std
    grid = InProcessGrid({n: reply_with(big, 10) for n in range(1, 5)})  # every update is zero
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.clip_norm=2.0",
                                "strategy.noise_multiplier=1.0", *overrides)
    got = run_strategy(strat, grid, big, report).arrays.to_torch_state_dict()["lora"].double()

    want = 1.0 * 2.0 / denominator
    assert report.rounds[0]["strategy"]["noise_std_on_mean"] == pytest.approx(want)
    assert got.mean().item() == pytest.approx(0.0, abs=4 * want / math.sqrt(got.numel()))
    assert got.std().item() == pytest.approx(want, rel=0.03)  # 20000 draws: ~0.5% std error


def _dp_accounting_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = RdpAccountant()
    event = dp_event.GaussianDpEvent(z) if q == 1.0 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "overrides, q",
    [([], 1.0), (["strategy.sampling=poisson", "strategy.sample_rate=0.5"], 0.5)],
)
def test_user_level_epsilon_matches_dp_accounting(tmp_path, make_cfg, overrides, q):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.1)) for n in range(1, 5)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.noise_multiplier=1.3", *overrides)
    run_strategy(strat, grid, REFERENCE, report, rounds=3)

    user = report.summary()["privacy"]["user_level"]
    delta = 1.0 / (10 * 4)
    assert user["delta"] == pytest.approx(delta) and user["rounds"] == 3 and user["sample_rate"] == q
    expected = _dp_accounting_epsilon(1.3, q, 3, delta)
    assert user["epsilon"] == pytest.approx(expected, rel=0.02)
    eps = [r["strategy"]["user_epsilon"] for r in report.rounds]
    assert eps[0] < eps[1] < eps[2] == user["epsilon"]  # composes over rounds


def test_a_round_that_would_exceed_the_user_level_budget_does_not_run(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.1)) for n in range(1, 5)})
    one_round = _dp_accounting_epsilon(2.0, 1.0, 1, 1 / 40)
    two_rounds = _dp_accounting_epsilon(2.0, 1.0, 2, 1 / 40)
    budget = (one_round + two_rounds) / 2  # room for exactly one round
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.noise_multiplier=2.0",
                                f"strategy.epsilon={budget}")
    run_strategy(strat, grid, REFERENCE, report, rounds=3)

    assert len(grid.sent) == 4  # only round 1 reached the clients
    # Round 2 is refused by the server and the round loop stops there: no round can ever run again.
    assert [r["round"] for r in report.rounds] == [1, 2]
    assert "user-level budget" in report.rounds[1]["failures"]["server"]
    assert "user-level budget" in report.run["stopped"]
    assert report.summary()["privacy"]["user_level"]["epsilon"] <= budget


def test_noise_is_calibrated_from_the_user_level_budget(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.1)) for n in range(1, 5)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.noise_multiplier=null", "strategy.epsilon=5",
                                "strategy.sampling=poisson", "strategy.sample_rate=0.5", "rounds=2")
    run_strategy(strat, grid, REFERENCE, report, rounds=2)
    user = report.summary()["privacy"]["user_level"]
    assert 4.9 <= user["epsilon"] <= 5.0 + 1e-6
    assert _dp_accounting_epsilon(user["noise_multiplier"], 0.5, 2, 1 / 40) == pytest.approx(5.0, rel=0.03)


@pytest.mark.parametrize("value, direction", [(1e-4, "down"), (10.0, "up")])
def test_adaptive_clip_norm_moves_toward_the_target_quantile(tmp_path, make_cfg, value, direction):
    # All updates tiny: every one unclipped (fraction 1 > target 0.5) so C must shrink by
    # exp(-0.2 * 0.5); all huge: fraction 0, C must grow by exp(0.2 * 0.5).
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, value)) for n in range(1, 5)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.adaptive=true", "strategy.clip_norm=1.0",
                                "strategy.noise_multiplier=1e-6", "strategy.clipped_count_stddev=1e-6")
    run_strategy(strat, grid, REFERENCE, report, rounds=2)

    factor = math.exp(-0.2 * 0.5) if direction == "down" else math.exp(0.2 * 0.5)
    first, second = (r["strategy"] for r in report.rounds)
    assert first["clip_norm"] == 1.0
    assert first["next_clip_norm"] == pytest.approx(factor, rel=1e-4)
    assert second["clip_norm"] == pytest.approx(factor, rel=1e-4)
    assert report.summary()["privacy"]["user_level"]["clip_norm"] == [1.0, pytest.approx(factor, rel=1e-4)]


def test_adaptive_clipping_spends_part_of_the_noise_on_the_count(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.0)) for n in range(1, 5)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.adaptive=true", "strategy.noise_multiplier=1.0",
                                "strategy.clipped_count_stddev=2.0")
    run_strategy(strat, grid, REFERENCE, report)
    z_update = (1.0 ** -2 - 4.0 ** -2) ** -0.5  # Andrew et al.: (z^-2 - (2 sigma_b)^-2)^-1/2
    user = report.summary()["privacy"]["user_level"]
    assert user["update_noise_multiplier"] == pytest.approx(z_update)
    assert report.rounds[0]["strategy"]["noise_std_on_sum"] == pytest.approx(z_update * 1.0)
    assert user["noise_multiplier"] == 1.0  # what the accountant composes


def test_delta_at_or_above_one_over_n_is_refused_before_any_training(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.1)) for n in range(1, 3)})
    strat, _ = dp_strategy(tmp_path, make_cfg, "strategy.delta=0.5")
    with pytest.raises(ConfigError, match="strategy.delta"):
        run_strategy(strat, grid, REFERENCE)
    assert grid.sent == []


def test_record_and_user_level_are_reported_separately_with_their_units(tmp_path, tiny_models):
    summary = run_federation(
        "+preset=tiny train.batch_size=16 train.epochs=0.001 privacy.noise_multiplier=1.0 "
        f"strategy=dp-fedavg strategy.noise_multiplier=2.0 rounds=1 {tiny_models.classifier[0]}", 2, tmp_path)
    privacy = summary["privacy"]
    assert privacy["enabled"] is True and privacy["unit"].startswith("record:")
    assert set(privacy["epsilon"]) == {"client-0", "client-1"}
    user = privacy["user_level"]
    assert user["enabled"] is True and user["unit"].startswith("client:")
    assert user["epsilon"] == pytest.approx(_dp_accounting_epsilon(2.0, 1.0, 1, 1 / 20), rel=0.02)
    assert [r["failures"] for r in summary["rounds"]] == [{}]
    assert summary["rounds"][0]["strategy"]["aggregated"] == 2
    assert (tmp_path / "adapters" / "round-1" / "adapter_config.json").is_file()


def test_user_level_is_reported_off_for_other_strategies(tmp_path, make_cfg):
    cfg = make_cfg()
    user = RunReport(tmp_path, to_plain(cfg)).summary()["privacy"]["user_level"]
    assert user["enabled"] is False and user["unit"].startswith("client:")


def test_sampled_clients_follow_the_configured_poisson_rate(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.0)) for n in range(1, 41)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.sampling=poisson", "strategy.sample_rate=0.25",
                                "strategy.min_available_clients=40")
    run_strategy(strat, grid, REFERENCE, report, rounds=5)
    sampled = [r["strategy"]["sampled"] for r in report.rounds]
    assert all(r["strategy"]["denominator"] == 10.0 for r in report.rounds)  # q N, not the realised count
    assert len(set(sampled)) > 1  # independent inclusion: the sample size varies
    assert 0.15 < np.mean(sampled) / 40 < 0.35  # 200 Bernoulli(0.25) draws


def test_progress_line_shows_the_user_level_epsilon(tmp_path, make_cfg):
    grid = InProcessGrid({n: reply_with(filled(REFERENCE, 0.1)) for n in range(1, 3)})
    strat, report = dp_strategy(tmp_path, make_cfg, "strategy.noise_multiplier=2.0")
    run_strategy(strat, grid, REFERENCE, report)
    report.record_eval(1, {"balanced_accuracy": 0.5})
    eps = report.summary()["privacy"]["user_level"]["epsilon"]
    assert f"user epsilon={eps:.3f}" in report.progress_line(1, 1)
