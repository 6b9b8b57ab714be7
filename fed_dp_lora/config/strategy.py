"""The `strategy` group: how the server samples clients and aggregates their adapters.

One dataclass per aggregator that has settings of its own; each conf/strategy/*.yaml extends
its schema, so a key that belongs to another strategy is refused when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting

STRATEGIES = ("fedavg", "dp-fedavg", "krum", "multi-krum", "trimmed-mean", "median")
# Aggregators that need every individual update: they cannot run under SecAgg+.
ROBUST_STRATEGIES = ("krum", "multi-krum", "trimmed-mean", "median")


@dataclass
class StrategyConfig(Group):
    """Sampling and round settings every strategy shares (fedavg and median add nothing)."""

    KEY: ClassVar[str] = "strategy"
    NAMES: ClassVar[tuple[str, ...]] = ("fedavg", "median")

    name: str = setting(
        "fedavg", "the aggregator; select it with the group option, e.g. `strategy=krum`", choices=STRATEGIES
    )
    fraction_train: float = setting(1.0, "fraction of connected clients sampled per round, in (0, 1]")
    min_train_clients: int = setting(
        2,
        "a round needs this many sampled clients and this many accepted "
        "updates; with fewer the adapter is kept and the round recorded as "
        "failed, and when clients out of budget leave too few the run stops",
    )
    min_available_clients: int = setting(2, "clients that must be connected before a round starts")
    round_timeout: float = setting(
        3600.0,
        "seconds to wait for a round's replies (a dead SuperNode is "
        "reported by the SuperLink after about a minute anyway)",
    )

    def validate(self) -> None:
        super().validate()
        require(
            self.name in self.NAMES,
            self.key("name"),
            f"{self.name} has settings of its own",
            f"select the group option strategy={self.name} instead of setting strategy.name",
        )
        require(0.0 < self.fraction_train <= 1.0, self.key("fraction_train"), "must be in (0, 1]", "e.g. 1.0")
        require(self.min_train_clients >= 1, self.key("min_train_clients"), "must be >= 1", "e.g. 2")
        require(self.round_timeout > 0, self.key("round_timeout"), "must be > 0 seconds", "e.g. 3600")


@dataclass
class KrumConfig(StrategyConfig):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 nearest neighbours."""

    NAMES: ClassVar[tuple[str, ...]] = ("krum",)

    num_malicious: int = setting(1, "f, the number of malicious clients tolerated (needs n >= 2f + 3)")

    def validate(self) -> None:
        super().validate()
        require(self.num_malicious >= 0, self.key("num_malicious"), "must be >= 0", "e.g. 1")


@dataclass
class MultiKrumConfig(KrumConfig):
    """Multi-Krum: the weighted average of the num_selected updates with the best Krum scores."""

    NAMES: ClassVar[tuple[str, ...]] = ("multi-krum",)

    num_selected: int | None = setting(None, "m updates averaged; null: n - f")

    def validate(self) -> None:
        super().validate()
        require(
            self.num_selected is None or self.num_selected >= 1,
            self.key("num_selected"),
            "must be >= 1",
            "e.g. 2, or null for n - f",
        )


@dataclass
class TrimmedMeanConfig(StrategyConfig):
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted."""

    NAMES: ClassVar[tuple[str, ...]] = ("trimmed-mean",)

    beta: float = setting(0.25, "fraction cut from each tail, in [0, 0.5); int(beta * n) values are cut")

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.beta < 0.5, self.key("beta"), f"{self.beta} is not in [0, 0.5)", "e.g. 0.25")


@dataclass
class DpFedAvgConfig(StrategyConfig):
    """DP-FedAvg: user-level DP on the sum of clipped updates, divided by a fixed denominator."""

    NAMES: ClassVar[tuple[str, ...]] = ("dp-fedavg",)

    sampling: str = setting(
        "fraction",
        "`fraction`: fixed-size sample of fraction_train (accounted without "
        "amplification); `poisson`: each client joins a round with "
        "probability sample_rate (accounted with Poisson subsampling)",
        choices=("fraction", "poisson"),
    )
    sample_rate: float | None = setting(None, "poisson: per-round inclusion probability in (0, 1]")
    clip_norm: float = setting(1.0, "L2 bound on a client's whole update (initial value if adaptive)")
    noise_multiplier: float | None = setting(
        1.0, "sigma / clip_norm on the sum; null: calibrated from strategy.epsilon"
    )
    epsilon: float | None = setting(
        None,
        "user-level budget: calibrates the noise when noise_multiplier "
        "is null, and no round starts that would exceed it",
    )
    delta: float | None = setting(None, "null: 1 / (10 N) for N connected clients; must be < 1/N")
    adaptive: bool = setting(False, "adaptive clipping (Andrew et al. 2021): clip_norm tracks a quantile")
    target_quantile: float = setting(0.5, "adaptive: fraction of updates that should be left unclipped")
    clip_lr: float = setting(0.2, "adaptive: geometric step size of the clip norm")
    clipped_count_stddev: float | None = setting(
        None, "adaptive: noise std on the unclipped count; null: expected clients / 20"
    )

    def validate(self) -> None:
        super().validate()
        if self.sampling == "poisson":
            require(
                self.sample_rate is not None and 0.0 < self.sample_rate <= 1.0,
                self.key("sample_rate"),
                f"{self.sample_rate} is not in (0, 1] for sampling=poisson",
                "e.g. strategy.sample_rate=0.5",
            )
        require(self.clip_norm > 0, self.key("clip_norm"), "must be > 0", "e.g. 1.0")
        self._validate_noise()
        if self.adaptive:
            require(0.0 <= self.target_quantile <= 1.0, self.key("target_quantile"), "must be in [0, 1]", "e.g. 0.5")
            require(self.clip_lr > 0, self.key("clip_lr"), "must be > 0", "e.g. 0.2")
            require(
                self.clipped_count_stddev is None or self.clipped_count_stddev > 0,
                self.key("clipped_count_stddev"),
                "must be > 0",
                "e.g. 1.0, or null for expected clients / 20",
            )

    def _validate_noise(self) -> None:
        require(
            self.noise_multiplier is not None or self.epsilon is not None,
            self.key("noise_multiplier"),
            "neither a noise multiplier nor a user-level budget is set",
            "set strategy.noise_multiplier=1.0 or strategy.epsilon=8",
        )
        require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            self.key("noise_multiplier"),
            "must be > 0",
            "set a positive value or null to calibrate from strategy.epsilon",
        )
        require(self.epsilon is None or self.epsilon > 0, self.key("epsilon"), "must be > 0", "e.g. 8")
        require(
            self.delta is None or 0.0 < self.delta < 1.0,
            self.key("delta"),
            f"{self.delta} is not in (0, 1)",
            "use null (1/(10 N)) or a value below 1/N for N clients",
        )


# The schema each conf/strategy/<name>.yaml extends.
SCHEMAS: dict[str, type[StrategyConfig]] = {
    "fedavg": StrategyConfig,
    "median": StrategyConfig,
    "krum": KrumConfig,
    "multi-krum": MultiKrumConfig,
    "trimmed-mean": TrimmedMeanConfig,
    "dp-fedavg": DpFedAvgConfig,
}
