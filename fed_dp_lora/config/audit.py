"""The `audit` section: empirical privacy audits that check the claimed epsilon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting


@dataclass
class ReleaseAuditConfig(Group):
    """White-box audit of one client's per-round releases (fed_dp_lora/audit)."""

    KEY: ClassVar[str] = "audit.release"

    enabled: bool = setting(False, "audit the releases of `audit.release.client`")
    client: int = setting(0, "partition id of the audited client (deployment: its node-config partition-id)")
    canaries: int = setting(1000, "Dirac gradient canaries (one coordinate each), each a record with probability 1/2")
    guesses: int = setting(200, 'fixed in advance: "in" for the guesses/2 highest scores, "out" for the lowest')

    def validate(self) -> None:
        super().validate()
        require(self.client >= 0, self.key("client"), "must be a partition id >= 0", "e.g. 0")
        require(
            2 <= self.guesses <= self.canaries and self.guesses % 2 == 0,
            self.key("guesses"),
            f"{self.guesses} is not an even number in [2, audit.release.canaries={self.canaries}]",
            "e.g. audit.release.guesses=200 with 1000 canaries",
        )


@dataclass
class AuditConfig(Group):
    """One-run privacy audit (Steinke, Nasr, Jagielski 2023) with random-label canaries."""

    KEY: ClassVar[str] = "audit"

    enabled: bool = setting(False, "plant canaries and report the empirical lower bound on epsilon")
    canaries: int = setting(500, "random-label canaries, each trained on with probability 1/2")
    guess_fraction: float = setting(0.2, "the auditor guesses on this share of canaries (half in, half out)")
    confidence: float = setting(0.95, "confidence of the lower bound, in [0.5, 1)")
    seed: int = setting(1234, "the auditor's secret: which canaries exist and which are included")
    release: ReleaseAuditConfig = setting(ReleaseAuditConfig(), "the per-round release audit")

    def validate(self) -> None:
        super().validate()
        require(self.canaries >= 2, self.key("canaries"), "must be at least 2", "e.g. audit.canaries=500")
        require(
            0.0 < self.guess_fraction <= 1.0 and int(self.canaries * self.guess_fraction) >= 2,
            self.key("guess_fraction"),
            f"{self.guess_fraction} of {self.canaries} canaries leaves fewer than 2 guesses",
            "use a fraction in (0, 1] with canaries * fraction >= 2, e.g. 0.2",
        )
        require(
            0.5 <= self.confidence < 1.0,
            self.key("confidence"),
            f"{self.confidence} is not in [0.5, 1)",
            "e.g. audit.confidence=0.95",
        )
        self.release.validate()
