"""The `privacy` group: record-level DP-SGD on every client (the unit is one record)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting


@dataclass
class PrivacyConfig(Group):
    """DP-SGD settings; conf/privacy/none.yaml turns it off through the same code path."""

    KEY: ClassVar[str] = "privacy"

    enabled: bool = setting(True, "false: the non-private baseline (refused by institutions unless they opt in)")
    epsilon: float | None = setting(8.0, "per-client budget for the whole run; also the calibration target")
    delta: float | None = setting(None, "null: 1 / (10 n) for a client with n records; must be < 1/n")
    noise_multiplier: float | None = setting(None, "null: calibrated from (epsilon, delta) for the planned run")
    clip_norm: float = setting(
        1.0, "per-sample L2 bound C over all trainable tensors; each recipe (conf/recipe) sets its own"
    )
    accountant: str = setting("rdp", "Opacus accountant", choices=("rdp", "prv"))
    seeded_noise: bool = setting(
        False,
        "true: batches and noise derived from `seed`, so a simulation is "
        "reproducible and anyone who knows the seed can remove the noise "
        "(refused in deployment); false: from a secret key per client",
    )

    def validate(self) -> None:
        super().validate()
        if self.enabled:
            self._validate_budget()
            require(self.clip_norm > 0, self.key("clip_norm"), "must be > 0", "e.g. 1.0")

    def _validate_budget(self) -> None:
        require(
            self.epsilon is not None or self.noise_multiplier is not None,
            self.key("epsilon"),
            "neither a budget nor a noise multiplier is set",
            "set privacy.epsilon=8 (or privacy.noise_multiplier and a budget)",
        )
        if self.epsilon is not None:
            require(
                self.epsilon > 0,
                self.key("epsilon"),
                f"{self.epsilon} <= 0",
                "use a positive budget, e.g. privacy.epsilon=8",
            )
        if self.noise_multiplier is not None:
            require(
                self.noise_multiplier > 0,
                self.key("noise_multiplier"),
                "must be > 0",
                "set a positive value or null to calibrate from privacy.epsilon",
            )
        if self.delta is not None:
            require(
                0.0 < self.delta < 1.0,
                self.key("delta"),
                f"{self.delta} is not in (0, 1)",
                "use null (1/(10 n)) or a value below 1/n",
            )
