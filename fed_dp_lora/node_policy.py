"""The institution's own policy, from its SuperNode's `--node-config`: it wins over the run config.

The server writes the run config, so anything that decides how much privacy an institution
gives up, or which of its columns are read, is set here by the institution. The run config can
only ask for less privacy loss. In deployment a node holds its data file (`data-path`), and with
DP on it must declare a lifetime budget (`epsilon`), its public record count (`records`) and a
state dir. A run with privacy off is refused unless the node opts in. The column mapping, the
table columns the probe's head may read and the label set are pinned by the node: a run that
asks for other columns or labels is refused.

A simulated client (no `data-path`, a `partition-id` from the simulation engine) reads a
partition of a public data set and has no policy of its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fed_dp_lora.config import ConfigError, validate
from fed_dp_lora.data.columns import column_names, declared


class PolicyError(ValueError):
    """The institution's policy refuses this run's request (detail logged locally, never sent)."""


# node-config key -> (type, what it sets)
NODE_KEYS: dict[str, tuple[type, str]] = {
    "data-path": (str, "the institution's records (.csv, .jsonl or .parquet)"),
    "state-dir": (str, "directory on the institution's disk for its privacy ledger and noise key"),
    "epsilon": (float, "the institution's lifetime budget over every study it joins (required with DP)"),
    "max-delta": (float, "the largest delta the institution accepts (default 1/(10 records))"),
    "records": (
        int,
        "the record count the institution declares publicly, at least the records in "
        "its file; it sets the sampling rate and the aggregation weight (required)",
    ),
    "labels": (
        str,
        'class names in index order, comma-separated, e.g. "good,bad" (required for '
        "classification): the run must use exactly these",
    ),
    "text-column": (str, "column holding the text (default text)"),
    "label-column": (str, "column holding the label (default label)"),
    "prompt-column": (str, "column holding the prompt, causal LM (default prompt)"),
    "response-column": (str, "column holding the response, causal LM (default response)"),
    "feature-columns": (
        str,
        "table columns the linear probe's head may read besides the text, comma-separated "
        "(default none): a run whose data.columns names another is refused",
    ),
    "allow-non-private": (bool, "true lets a run with privacy off train on this node's data"),
    "name": (str, "the institution's public name, shown in the server's report"),
    "batch-size": (int, "local expected batch size (train.batch_size)"),
    "device": (str, "auto | cpu | cuda (train.device)"),
    "partition-id": (int, "simulation / audit slot: this client's partition index"),
    "num-partitions": (int, "simulation / audit slot: number of partitions"),
}
PINNED_COLUMNS = {
    "text-column": "text_column",
    "label-column": "label_column",
    "prompt-column": "prompt_column",
    "response-column": "response_column",
}


@dataclass(frozen=True)
class NodePolicy:
    """Where this client's records and privacy state live, and the limits it accepts."""

    data_path: str | None
    state_dir: str | None
    partition: tuple[int, int] | None
    records: int | None = None
    lifetime_epsilon: float | None = None
    max_delta: float | None = None
    name: str | None = None

    @property
    def deployment(self) -> bool:
        """An institution with its own file (not a simulated client on a public partition)."""
        return self.data_path is not None


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """A simulated client: a slot of a public partition and no data file of its own. An institution
    (NodePolicy.deployment) always has a data-path, so it is never simulated."""
    return "data-path" not in node_config and "partition-id" in node_config


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise PolicyError(f"node-config {key}: {problem}. Fix: {fix}")


def _value(node_config: Mapping[str, Any], key: str) -> Any:
    kind, meaning = NODE_KEYS[key]
    value = node_config[key]
    if kind is str:
        ok = isinstance(value, str) and value != ""
    elif kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (kind is float or float(value).is_integer())
        )
    example = {str: '"/path"', bool: "true", float: "4", int: "64"}[kind]
    _require(
        ok,
        key,
        f"{value!r} is not a {kind.__name__} ({meaning})",
        f"start the SuperNode with --node-config '{key}={example}'",
    )
    return kind(value)


def parse(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """Typed node-config values; PolicyError names an unknown key or a bad value."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    _require(
        not unknown,
        ",".join(unknown),
        "unknown key(s)",
        "use only " + ", ".join(f"{k} ({v[1]})" for k, v in NODE_KEYS.items()),
    )
    values = {k: _value(node_config, k) for k in node_config}
    for key in ("epsilon", "records", "batch-size"):
        _require(values.get(key, 1) > 0, key, f"{values.get(key)} <= 0", "give a positive value")
    _require(
        0 < values.get("max-delta", 0.5) < 1,
        "max-delta",
        f"{values.get('max-delta')} is not in (0, 1)",
        "e.g. max-delta=1e-5",
    )
    _require(
        values.get("device", "auto") in ("auto", "cpu", "cuda"),
        "device",
        f"{values.get('device')!r} is not auto, cpu or cuda",
        "use one of them",
    )
    if "labels" in values:
        labels = [x.strip() for x in values["labels"].split(",")]
        _require(
            len(labels) >= 2 and all(labels) and len(set(labels)) == len(labels),
            "labels",
            f"{values['labels']!r} is not a list of 2 or more distinct names",
            'e.g. labels="good,bad"',
        )
        values["labels"] = labels
    for key in ("data-path", "state-dir"):
        _require(
            key not in values or Path(values[key]).is_absolute(),
            key,
            f"{values.get(key)!r} is not absolute",
            "use an absolute path",
        )
    return values


def apply_node_config(cfg: DictConfig, node_config: Mapping[str, Any]) -> tuple[DictConfig, NodePolicy]:
    """This client's configuration: the run's, limited by the institution's policy.

    ConfigError: the run config itself is invalid (a function of the server's input only).
    PolicyError: the institution's settings are wrong, or refuse what the run asks.
    """
    values = parse(node_config)
    cfg = cfg.copy()
    if "batch-size" in values:
        cfg.train.batch_size = values["batch-size"]
    if "device" in values:
        cfg.train.device = values["device"]
    has_slot = "partition-id" in values and "num-partitions" in values
    partition = (int(values["partition-id"]), int(values["num-partitions"])) if has_slot else None
    _require(
        partition is None or 0 <= partition[0] < partition[1],
        "partition-id",
        f"{partition} is not a slot in [0, num-partitions)",
        "fix the slot numbers",
    )
    _require(
        "data-path" in values or partition is not None,
        "data-path",
        "is missing",
        'start the SuperNode with --node-config \'data-path="/path/to/records.csv" '
        'state-dir="/path/to/state" records=<count> epsilon=<budget>\'',
    )
    policy = NodePolicy(
        values.get("data-path"),
        values.get("state-dir"),
        partition,
        values.get("records"),
        values.get("epsilon"),
        values.get("max-delta"),
        values.get("name"),
    )
    if policy.deployment:
        _deployment_rules(cfg, values)
    try:
        validate(cfg)
    except ConfigError as err:
        raise PolicyError(f"the run's settings with this node's values are invalid: {err}") from err
    return cfg, policy


def _deployment_rules(cfg: DictConfig, values: dict[str, Any]) -> None:
    """What an institution with its own data requires of every run."""
    if not cfg.privacy.enabled:
        _require(
            values.get("allow-non-private", False),
            "allow-non-private",
            "the run has privacy off, and this node does not allow that",
            "run with privacy on, or (only if the institution accepts releasing un-noised "
            "updates) start the SuperNode with allow-non-private=true",
        )
    else:
        for key in ("state-dir", "epsilon", "records"):
            _require(
                key in values,
                key,
                "is missing: an institution with DP on must set it",
                f"add {key}=... to --node-config ({NODE_KEYS[key][1]})",
            )
        _require(
            not cfg.privacy.seeded_noise,
            "state-dir",
            "the run asks for noise derived from its seed, which anyone knowing the seed can remove",
            "run with privacy.seeded_noise=false (each institution's noise comes from its own key)",
        )
    _require(
        "records" in values,
        "records",
        "is missing",
        "add records=<count> (the record count you declare publicly, at least your file's)",
    )
    for key, field in PINNED_COLUMNS.items():
        pinned = values.get(key, field.removesuffix("_column"))
        _require(
            cfg.data[field] == pinned,
            key,
            f"the run asks for column {cfg.data[field]!r}, this node pins {pinned!r}",
            f"run with data.{field}={pinned}, or change the node's {key}",
        )
    _column_rule(cfg, values)
    if cfg.model.task == "classification":
        _require("labels" in values, "labels", "is missing", 'add labels="<class>,<class>,..." (index order)')
        asked = None if cfg.data.labels is None else [str(x) for x in cfg.data.labels]
        _require(
            asked in (None, values["labels"]),
            "labels",
            f"the run asks for labels {asked}, this node pins {values['labels']}",
            f"run with data.labels=[{','.join(values['labels'])}]",
        )
        cfg.data.labels = values["labels"]


def _column_rule(cfg: DictConfig, values: dict[str, Any]) -> None:
    """The head reads only the table columns the institution allows (data.columns, linear probe)."""
    asked = column_names(declared(cfg))
    allowed = [c.strip() for c in values.get("feature-columns", "").split(",") if c.strip()]
    refused = [c for c in asked if c not in allowed]
    _require(
        not refused,
        "feature-columns",
        f"the run asks the head to read column(s) {refused}; this node allows {allowed or 'none'}",
        f'add feature-columns="{",".join(asked)}" if the institution accepts, or run with '
        "data.columns.numeric=[] data.columns.categorical=[]",
    )


def resolve_delta(cfg: DictConfig, policy: NodePolicy, records: int) -> float:
    """The study's delta: the run's (or 1/(10 records)), never above the node's max-delta."""
    delta = 1.0 / (10.0 * records) if cfg.privacy.delta is None else float(cfg.privacy.delta)
    delta = delta if policy.max_delta is None else min(delta, policy.max_delta)
    # records >= the true count, so delta < 1/records also keeps delta below 1/n.
    _require(
        delta < 1.0 / records,
        "records",
        f"delta {delta:g} >= 1/records = {1.0 / records:.3g}, which permits releasing a whole record",
        f"use privacy.delta (or max-delta) below {1.0 / records:.3g}",
    )
    return delta


def simulation_state_dir(study: str, partition: int) -> Path:
    """Where a simulated client keeps its state: outside the run's output-dir, so sharing a
    run's outputs never shares the simulated clients' noise keys. A simulation is not a privacy
    boundary: every simulated institution lives on the server's machine."""
    root = Path(os.environ.get("FED_DP_LORA_STATE", Path.home() / ".local" / "state" / "fed-dp-lora"))
    return root / "simulation" / study / f"partition-{partition}"


def markdown() -> str:
    """The node-config keys as the table docs/privacy.md shows (generated, so it cannot drift)."""
    flags = {
        "data-path": "--data",
        "state-dir": "--state-dir",
        "epsilon": "--epsilon",
        "max-delta": "--max-delta",
        "records": "--records",
        "labels": "--labels",
        "text-column": "--text-column",
        "label-column": "--label-column",
        "feature-columns": "--feature-columns",
        "allow-non-private": "--allow-non-private",
        "name": "--name",
        "batch-size": "--batch-size",
        "device": "--device",
    }
    rows = ["| node-config key | `supernode.sh` flag | type | meaning |", "|---|---|---|---|"]
    rows += [
        f"| `{key}` | {f'`{flags[key]}`' if key in flags else ''} | {kind.__name__} | {meaning} |"
        for key, (kind, meaning) in NODE_KEYS.items()
    ]
    return "\n".join(rows)
