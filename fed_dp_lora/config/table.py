"""The configuration reference of docs/configuration.md, generated from the schema and conf/.

Every key's type, default and meaning come from the dataclasses (via `keys.walk`), each group's
presets from its YAML files, and the defaults from the composed default run, so the page cannot
drift from what a run reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf

from fed_dp_lora.config.compose import CONF_DIR, compose_config, to_plain
from fed_dp_lora.config.keys import FieldSpec, describe, walk
from fed_dp_lora.config.strategy import SCHEMAS


def _value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(str(v) for v in value)}]`"
    return "" if value == "???" else f"`{value}`"


def _default(spec: FieldSpec, run: dict[str, Any]) -> str:
    """The default run's value; a key outside it (another strategy's) shows its declared default."""
    node: Any = run
    for part in spec.key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _value(spec.default)
        node = node[part]
    return _value(node)


def _meaning(spec: FieldSpec) -> str:
    text = spec.help
    if spec.choices:
        text = (
            f"one of {', '.join(f'`{c}`' for c in spec.choices)}: {text}"
            if text
            else f"one of {', '.join(f'`{c}`' for c in spec.choices)}"
        )
    if spec.key.startswith("strategy."):
        field = spec.key.partition(".")[2]
        names = [n for n, schema in SCHEMAS.items() if field in {f.name for f in dataclasses.fields(schema)}]
        if len(names) < len(SCHEMAS):
            text = f"({', '.join(f'`strategy={n}`' for n in names)}) {text}"
    return text.replace("|", "\\|")


# Groups whose presets set keys across sections (`# @package _global_`), shown under the section they select.
GLOBAL_GROUPS = {"train": "recipe"}


def _flat(values: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested preset values as dotted keys: {"train": {"lr": 0.003}} -> {"train.lr": 0.003}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _presets(group: str, default: str) -> str:
    """The group's YAML presets and the keys each sets, e.g. `smollm2`: task=causal-lm, ..."""
    folder = CONF_DIR / group
    if not folder.is_dir():
        return ""
    items = []
    for path in sorted(folder.glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(values, dict)
        values.pop("defaults", None)
        flat = _flat(values)
        sets = ", ".join(f"{k!s}={_value(v).strip('`')}" for k, v in flat.items())
        mark = " (default)" if path.stem == default else ""
        items.append(f"`{group}={path.stem}`{mark}" + (f": {sets}" if sets else ""))
    return "Presets in `conf/" + group + "/`: " + "; ".join(items) + ".\n\n"


def markdown() -> str:
    """One table per top-level section: key, type, default and meaning."""
    run = to_plain(compose_config([]))
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    assert isinstance(defaults, list)
    chosen = {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}
    sections: dict[str, list[FieldSpec]] = {"": []}  # the root's own keys first
    for spec in walk():
        sections.setdefault(spec.key.split(".")[0] if "." in spec.key else "", []).append(spec)
    blocks = []
    for section, specs in sections.items():
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        rows += [f"| `{s.key}` | {describe(s.key)} | {_default(s, run)} | {_meaning(s)} |" for s in specs]
        title = f"### `{section}`" if section else "### Run"
        group = GLOBAL_GROUPS.get(section, section)
        presets = _presets(group, chosen.get(group, "")) if section else ""
        blocks.append(f"{title}\n\n{presets}" + "\n".join(rows))
    return "\n\n".join(blocks)
