"""The root of the configuration tree, and its registration in Hydra's ConfigStore.

conf/config.yaml extends `schema/run`; each group's YAML extends `/schema/<group>` (strategies
`/schema/strategy/<name>`), so Hydra refuses an unknown key or a wrongly typed value while it
composes, and every value arrives with its declared type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fed_dp_lora.config.audit import AuditConfig
from fed_dp_lora.config.data import DataConfig
from fed_dp_lora.config.fields import Group, require, setting
from fed_dp_lora.config.lora import AdapterConfig
from fed_dp_lora.config.model import ModelConfig
from fed_dp_lora.config.privacy import PrivacyConfig
from fed_dp_lora.config.sections import (
    AttackConfig,
    EvalConfig,
    ProbeConfig,
    SecAggPlusConfig,
    TrackingConfig,
    TrainConfig,
    UploadConfig,
)
from fed_dp_lora.config.strategy import SCHEMAS, StrategyConfig


@dataclass
class RunConfig(Group):
    """Everything a run reads. Groups (model, data, lora, privacy, strategy) come from conf/ presets."""

    KEY: ClassVar[str] = ""

    model: ModelConfig = setting(MISSING, "the base model (presets: conf/model)")
    data: DataConfig = setting(MISSING, "the records (presets: conf/data)")
    lora: AdapterConfig = setting(MISSING, "the adapter (presets: conf/lora)")
    privacy: PrivacyConfig = setting(MISSING, "record-level DP-SGD (presets: conf/privacy)")
    strategy: StrategyConfig = setting(MISSING, "the server's aggregator (presets: conf/strategy)")
    seed: int = setting(0, "seed of partitioning, sampling and (with privacy.seeded_noise) noise")
    output_dir: str | None = setting(None, "set from the run config key `output-dir` (an absolute path)")
    resume: bool = setting(
        False, "set from the run config key `resume`: continue the run in output-dir from its last completed round"
    )
    rounds: int = setting(3, "federated rounds")
    train: TrainConfig = setting(TrainConfig(), "local training (method and its settings: conf/recipe)")
    probe: ProbeConfig = setting(ProbeConfig(), "the linear probe's feature centring")
    eval: EvalConfig = setting(EvalConfig(), "central evaluation")
    upload: UploadConfig = setting(UploadConfig(), "the client's reply")
    secagg: bool = setting(False, "true: Flower SecAgg+, the server sees only the sum (fedavg, dp-fedavg)")
    secaggplus: SecAggPlusConfig = setting(SecAggPlusConfig(), "SecAgg+ protocol settings")
    attack: AttackConfig = setting(AttackConfig(), "simulated malicious clients")
    audit: AuditConfig = setting(AuditConfig(), "privacy audits")
    tracking: TrackingConfig = setting(TrackingConfig(), "metrics tracking")

    def sections(self) -> list[Group]:
        """Every group and section, each checked by its own validate()."""
        return [
            self.model,
            self.data,
            self.lora,
            self.privacy,
            self.strategy,
            self.train,
            self.probe,
            self.eval,
            self.upload,
            self.secaggplus,
            self.attack,
            self.audit,
            self.tracking,
        ]

    def validate(self) -> None:
        """The root's own keys, then each section's checks (rules across groups: config/rules.py)."""
        require(self.rounds >= 1, "rounds", "must be at least 1", "e.g. rounds=4")
        for section in self.sections():
            section.validate()
        if self.output_dir is not None:
            require(
                Path(self.output_dir).is_absolute(),
                "output-dir",
                f"{self.output_dir!r} is not an absolute path",
                "pass an absolute path: -c 'output-dir=\"/abs/path\"'",
            )


# Schemas live in their own group, so `model=...` lists only the presets in conf/model.
SCHEMA_GROUP = "schema"
GROUP_SCHEMAS: dict[str, type[Group]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": AdapterConfig,
    "privacy": PrivacyConfig,
}


def register() -> None:
    """Store the schemas the YAML files extend (idempotent: ConfigStore replaces by name)."""
    store = ConfigStore.instance()
    store.store(group=SCHEMA_GROUP, name="run", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=SCHEMA_GROUP, name=group, node=schema)
    for name, schema in SCHEMAS.items():
        store.store(group=f"{SCHEMA_GROUP}/strategy", name=name, node=schema(name=name))
