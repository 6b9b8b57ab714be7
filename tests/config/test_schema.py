"""The typed schema: each group's checks beside its fields, presets that compose, one-line errors."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from fed_dp_lora.config import ConfigError, compose, compose_config, validate
from fed_dp_lora.config.audit import AuditConfig, ReleaseAuditConfig
from fed_dp_lora.config.data import DataConfig, LearningRates
from fed_dp_lora.config.fields import Group
from fed_dp_lora.config.keys import walk
from fed_dp_lora.config.lora import AdapterConfig
from fed_dp_lora.config.model import ModelConfig
from fed_dp_lora.config.privacy import PrivacyConfig
from fed_dp_lora.config.root import RunConfig
from fed_dp_lora.config.sections import AttackConfig, EvalConfig, ProbeConfig, SecAggPlusConfig, TrainConfig
from fed_dp_lora.config.strategy import SCHEMAS, DpFedAvgConfig, KrumConfig, StrategyConfig, TrimmedMeanConfig

CONF = compose.CONF_DIR
PRESETS = [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))]


def _refused(group: Group) -> str:
    with pytest.raises(ConfigError) as info:
        group.validate()
    return str(info.value)


# --- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("group, name", PRESETS, ids=[f"{g}={n}" for g, n in PRESETS])
def test_every_yaml_preset_composes_and_validates(group, name):
    prefix = "+" if group == "preset" else ""
    # The default recipe trains a classification head; a causal-lm model needs recipe=lora.
    recipe = ["recipe=lora"] if (group, name) == ("model", "smollm2") else []
    run = validate(compose_config([f"{prefix}{group}={name}", *recipe]))
    if group == "strategy":
        assert type(run.strategy) is SCHEMAS[name] and run.strategy.name == name


def test_presets_cover_every_group():
    assert {g for g, _ in PRESETS} == {"model", "data", "lora", "privacy", "strategy", "preset", "recipe"}


def test_values_arrive_with_their_declared_types():
    cfg = compose_config(["lora.alpha=16", "secaggplus.num_shares=3"])
    assert isinstance(cfg.lora.alpha, float) and cfg.secaggplus.num_shares == 3
    assert isinstance(cfg.secaggplus.num_shares, int)  # a count, not a fraction
    assert compose_config(["model.quantization=4"]).model.quantization == "4"  # a choice, as text
    run = validate(compose_config(["strategy=krum"]))
    assert isinstance(run, RunConfig) and isinstance(run.strategy, KrumConfig)


# --- per-group checks, on the dataclasses themselves -------------------------------------


def test_every_group_default_passes_its_own_checks():
    model = ModelConfig(name="minilm", lora_targets=["query"])
    for group in (model, DataConfig(), AdapterConfig(), PrivacyConfig(), TrainConfig(), EvalConfig(),
                  SecAggPlusConfig(), AttackConfig(), AuditConfig(), ProbeConfig(),
                  *(s(name=n) for n, s in SCHEMAS.items())):
        group.validate()


@pytest.mark.parametrize(
    "group, message",
    [
        (AdapterConfig(r=0), "lora.r: rank 0 < 1. Fix: use a rank of 1 or more"),
        (AdapterConfig(target_modules=[]), "lora.target_modules: is empty"),
        (AdapterConfig(target_modules=[1]), "lora.target_modules: [1] is neither"),
        (AdapterConfig(mode="full"), "lora.mode: unknown value 'full'. Fix: use one of vanilla, ffa"),
        (ModelConfig(name="m", lora_targets=[]), "model.lora_targets: is empty"),
        (ModelConfig(name="m", lora_targets=["q"], keep_layers=0), "model.keep_layers: must be at least 1"),
        (PrivacyConfig(epsilon=None), "privacy.epsilon: neither a budget nor a noise multiplier"),
        (PrivacyConfig(delta=2.0), "privacy.delta: 2.0 is not in (0, 1)"),
        (DataConfig(source="hub"), "data.name: is missing"),
        (DataConfig(partitioner="column"), "data.partition_column: is missing"),
        (TrainConfig(max_length=4), "train.max_length: must be >= 8"),
        (TrainConfig(method="finetune"), "train.method: unknown value 'finetune'. Fix: use one of linear-probe, lora"),
        (TrainConfig(lr=0.0), "train.lr: must be > 0"),
        (DataConfig(lr=LearningRates(private=0.0)), "data.lr.private: must be > 0"),
        (DataConfig(max_length=4), "data.max_length: must be >= 8"),
        (ProbeConfig(center_clip=0.0), "probe.center_clip: must be > 0"),
        (EvalConfig(batch_size=True), "eval.batch_size: True is neither auto nor"),
        (SecAggPlusConfig(num_shares=1), "secaggplus.num_shares: 1 is neither a fraction"),
        (AttackConfig(fraction=1.0), "attack.fraction: 1.0 is not in [0, 1)"),
        (AuditConfig(guess_fraction=0.001), "audit.guess_fraction: 0.001 of 500 canaries"),
        (AuditConfig(release=ReleaseAuditConfig(guesses=3)), "audit.release.guesses: 3 is not an even number"),
        (StrategyConfig(name="krum"), "strategy.name: krum has settings of its own. Fix: select the group option"),
        (KrumConfig(name="krum", num_malicious=-1), "strategy.num_malicious: must be >= 0"),
        (TrimmedMeanConfig(name="trimmed-mean", beta=0.5), "strategy.beta: 0.5 is not in [0, 0.5)"),
        (DpFedAvgConfig(name="dp-fedavg", noise_multiplier=None), "strategy.noise_multiplier: neither"),
        (DpFedAvgConfig(name="dp-fedavg", adaptive=True, clip_lr=0.0), "strategy.clip_lr: must be > 0"),
    ],
)
def test_each_group_checks_its_own_fields(group, message):
    refused = _refused(group)
    assert refused.startswith(message) and "Fix: " in refused and "\n" not in refused, refused


def test_privacy_checks_apply_only_when_privacy_is_on():
    PrivacyConfig(enabled=False, epsilon=-1.0, clip_norm=0.0).validate()


def test_every_field_declares_its_help_and_a_known_section():
    specs = list(walk())
    assert all(spec.help for spec in specs), [s.key for s in specs if not s.help]
    sections = {spec.key.split(".")[0] for spec in specs if "." in spec.key}
    assert sections == {f.name for f in dataclasses.fields(RunConfig)} - {"seed", "output_dir", "resume", "rounds",
                                                                          "secagg"}


# --- one-line errors for unknown keys and wrong types, before any training ----------------


@pytest.mark.parametrize(
    "override, start",
    [
        ("lora.rank=4", "lora.rank: no such key. Fix: did you mean lora.r?"),
        ("train.lrate=0.1", "train.lrate: no such key. Fix: did you mean train.lr?"),
        ("+data.extra=1", "data.extra: no such key. Fix: "),
        ("+audit.release.x=1", "audit.release.x: no such key. Fix: audit.release holds enabled, client"),
        ("strategy.beta=0.3", "strategy.beta: no such key. Fix: strategy.beta belongs to strategy=trimmed-mean"),
        ("+strategy.num_malicious=1", "strategy.num_malicious: no such key. Fix: strategy.num_malicious belongs "
                                      "to strategy=krum"),
        ("lora.r=2.5", "lora.r: 2.5 is not a whole number. Fix: set lora.r to a whole number"),
        ("privacy.epsilon=high", "privacy.epsilon: 'high' is not a number or null. Fix: set privacy.epsilon to a "
                                 "number or null"),
        ("data.class_weights=[a,b]", "data.class_weights[0]: 'a' is not allowed here. Fix: set data.class_weights "
                                     "to a list of numbers or null"),
        ("privacy.enabled=yes", "privacy.enabled: 'yes' is not true or false. Fix: set privacy.enabled to true"),
        ("secagg=1", "secagg: 1 is not true or false. Fix: set secagg to true or false"),
        ("model=foo", "model: could not find 'model/foo'. Fix: Available options in 'model': minilm, smollm2"),
    ],
)
def test_unknown_key_or_wrong_type_is_one_line_naming_key_and_fix(override, start):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that compose_config reads, to add presets a user might write."""
    copy = tmp_path / "conf"
    shutil.copytree(CONF, copy)
    monkeypatch.setattr(compose, "CONF_DIR", copy)
    return copy


@pytest.mark.parametrize(
    "body, start",
    [
        ("source: file\ncolum: text\n", "data.colum: no such key. Fix: "),
        ("source: file\ntest_fraction: lots\n", "data.test_fraction: 'lots' is not a number. Fix: set"),
        ("source: file\nlabels: good\n", "data.labels: 'good' is not a list of names or null. Fix: set"),
    ],
)
def test_a_yaml_preset_is_checked_against_its_schema(conf_copy, body, start):
    (conf_copy / "data" / "mine.yaml").write_text("defaults:\n  - /schema/data@_here_\n  - _self_\n" + body)
    with pytest.raises(ConfigError) as info:
        compose_config(["data=mine"])
    assert str(info.value).startswith(start), str(info.value)


def test_a_new_yaml_preset_that_extends_its_schema_composes(conf_copy):
    (conf_copy / "data" / "mine.yaml").write_text(
        "defaults:\n  - /schema/data@_here_\n  - _self_\nsource: file\npath: /x.csv\nlabels: [bad, good]\n")
    cfg = compose_config(["data=mine"])
    assert cfg.data.labels == ["bad", "good"] and cfg.data.text_column == "text"  # the schema's default
