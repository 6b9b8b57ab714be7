"""The strategy named by `strategy.name`, built from its config group (validated in fed_dp_lora/config/)."""

from __future__ import annotations

from omegaconf import DictConfig

from fed_dp_lora.strategies.averaging import AdapterFedAvg, CheckedAggregation
from fed_dp_lora.strategies.dp_fedavg import AdapterDPFedAvg, UserLevelDP
from fed_dp_lora.strategies.robust import AdapterMedian, AdapterMultiKrum, AdapterTrimmedMean


def user_level_dp(cfg: DictConfig) -> UserLevelDP:
    """The DP-FedAvg mechanism configured by strategy=dp-fedavg."""
    s = cfg.strategy
    optional = lambda v: None if v is None else float(v)  # noqa: E731
    return UserLevelDP(
        clip_norm=float(s.clip_norm),
        noise_multiplier=optional(s.noise_multiplier),
        epsilon=optional(s.epsilon),
        delta=optional(s.delta),
        sampling=str(s.sampling),
        sample_rate=optional(s.sample_rate),
        fraction=float(s.fraction_train),
        min_clients=int(s.min_train_clients),
        rounds=int(cfg.rounds),
        adaptive=bool(s.adaptive),
        target_quantile=float(s.target_quantile),
        clip_lr=float(s.clip_lr),
        clipped_count_stddev=optional(s.clipped_count_stddev),
    )


def build_strategy(cfg: DictConfig) -> CheckedAggregation:
    """A Flower Strategy subclass; every one screens updates and returns a RoundOutcome like AdapterFedAvg."""
    s = cfg.strategy
    common = dict(
        fraction_train=float(s.fraction_train),
        min_train_nodes=int(s.min_train_clients),
        min_available_nodes=int(s.min_available_clients),
    )
    if s.name == "fedavg":
        return AdapterFedAvg(**common)
    if s.name == "dp-fedavg":
        return AdapterDPFedAvg(user_level_dp(cfg), **common)
    if s.name == "krum":
        return AdapterMultiKrum(int(s.num_malicious), 1, **common)
    if s.name == "multi-krum":
        selected = None if s.num_selected is None else int(s.num_selected)
        return AdapterMultiKrum(int(s.num_malicious), selected, **common)
    if s.name == "trimmed-mean":
        return AdapterTrimmedMean(beta=float(s.beta), **common)
    if s.name == "median":
        return AdapterMedian(**common)
    raise ValueError(f"unknown strategy {s.name!r}")  # config.validate lists the names
