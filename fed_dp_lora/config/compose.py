"""Compose conf/ with Hydra against the registered schemas, and turn its errors into one line."""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from fed_dp_lora.config.fields import ConfigError, require
from fed_dp_lora.config.keys import describe, lookup, unknown_key_fix
from fed_dp_lora.config.root import RunConfig, register
from fed_dp_lora.config.rules import check_rules

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

register()


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (the compose API, never @hydra.main)."""
    try:
        _refuse_loose_booleans(overrides)
        # `with` makes this re-entrant: a reused Ray actor composes again without
        # "GlobalHydra is already initialized".
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_composition_error(err, overrides)) from err
    _refuse_added_keys(cfg)
    return cfg


def _composition_error(err: HydraException | OmegaConfBaseException, overrides: list[str]) -> str:
    cause = _omegaconf_cause(err)
    if cause is not None:
        return _explain(cause)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        missing = str(err.missing_cfg_file)
        group = missing.rpartition("/")[0]
        return (
            f"{group}: could not find '{missing}'. Fix: Available options in '{group}': "
            f"{', '.join(err.options)} (groups are listed in conf/)"
        )
    detail = " ".join(str(err).split())
    return (
        f"invalid override in {overrides}: {detail}. Overrides look like "
        "'privacy.epsilon=1 lora.r=16' or 'privacy=none'; groups are listed in conf/."
    )


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    """The schema violation (unknown key, wrong type) behind Hydra's composition error, if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (ValidationError, ConfigKeyError, ConfigAttributeError)) and seen.full_key:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _explain(err: OmegaConfBaseException) -> str:
    """One line naming the key at fault and the fix."""
    key = str(err.full_key)
    if isinstance(err, ValidationError):
        listed = re.fullmatch(r"(.+)\[\d+\]", key)  # an element of a list: name the list
        target = listed.group(1) if listed else key
        problem = "is not allowed here" if listed else f"is not {describe(key)}"
        return f"{key}: {err.value!r} {problem}. Fix: set {target} to {describe(target)}"
    return f"{key}: no such key. Fix: {unknown_key_fix(key)}"


def _refuse_added_keys(node: DictConfig, prefix: str = "") -> None:
    """`+section.key=value` adds a key Hydra does not check against the schema: refuse it here."""
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else set()
    for name in map(str, node.keys()):
        key = f"{prefix}{name}"
        if name not in declared:
            raise ConfigError(f"{key}: no such key. Fix: {unknown_key_fix(key)}")
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _refuse_added_keys(child, key + ".")


def _refuse_loose_booleans(overrides: list[str]) -> None:
    """OmegaConf reads `yes`, `on` or 1 as true; a switch that decides privacy takes true or false only."""
    for override in OverridesParser.create().parse_overrides(overrides):
        spec = lookup(override.key_or_group)
        if spec is not None and spec.kind is bool and not override.is_delete():
            value = override.value()
            require(
                isinstance(value, bool),
                override.key_or_group,
                f"{value!r} is not true or false",
                f"set {override.key_or_group} to true or false",
            )


def load_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Build the validated configuration from Flower's run config (`overrides`, `output-dir`)."""
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    cfg = compose_config(overrides)
    cfg.output_dir = str(run_config.get("output-dir", "") or "") or None
    resume = run_config.get("resume", False)
    if isinstance(resume, str):  # `-c resume=true` arrives as a bool; a quoted value as text
        resume = {"true": True, "false": False}.get(resume.strip().lower(), resume)
    require(
        isinstance(resume, bool),
        "resume",
        f"{resume!r} is not true or false",
        "pass -c resume=true to continue a stopped run, or leave it out",
    )
    cfg.resume = resume
    validate(cfg)
    return cfg


def typed(cfg: DictConfig) -> RunConfig:
    """The composed tree as its dataclasses (each group's own type, e.g. KrumConfig for strategy=krum)."""
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err) if err.full_key else str(err)) from err
    assert isinstance(run, RunConfig)
    return run


def validate(cfg: DictConfig) -> RunConfig:
    """Check every key that does not need the data; ConfigError names the key and the fix."""
    run = typed(cfg)
    run.validate()
    check_rules(run)
    return run


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain Python (for summary.json)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
