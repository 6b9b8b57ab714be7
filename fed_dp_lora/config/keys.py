"""The schema's keys as data: each dotted key's type, default, help and choices.

Error messages (which type a key takes, which key was meant) and the generated table in
docs/configuration.md read the dataclasses through this one module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

from omegaconf import MISSING

from fed_dp_lora.config.root import RunConfig
from fed_dp_lora.config.strategy import SCHEMAS


@dataclass(frozen=True)
class FieldSpec:
    """One leaf of the schema: its dotted key, declared type and documentation."""

    key: str
    kind: Any  # the declared type without Optional
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...]
    takes: str  # what it accepts, in words, where the type says too little ("" otherwise)
    owner: type  # the dataclass that declares it (for strategy keys: which strategy)


def _schemas(kind: Any) -> list[type]:
    """The dataclasses a node of this declared type may hold (a strategy: any strategy's)."""
    if kind is SCHEMAS["fedavg"]:
        return list(dict.fromkeys(SCHEMAS.values()))
    return [kind] if isinstance(kind, type) and dataclasses.is_dataclass(kind) else []


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True  # noqa: UP007 (built at run time)
    return hint, False


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return MISSING


def _fields(owner: type, prefix: str) -> Iterator[FieldSpec]:
    hints = typing.get_type_hints(owner)
    for spec in dataclasses.fields(owner):
        kind, optional = _strip_optional(hints[spec.name])
        yield FieldSpec(
            prefix + spec.name,
            kind,
            optional,
            _default(spec),
            spec.metadata.get("help", ""),
            spec.metadata.get("choices", ()),
            spec.metadata.get("takes", ""),
            owner,
        )


def walk(owner: type = RunConfig, prefix: str = "") -> Iterator[FieldSpec]:
    """Every leaf key under owner, depth first; a strategy's keys once, from the class declaring them."""
    seen: set[str] = set()
    for spec in _fields(owner, prefix):
        schemas = _schemas(spec.kind)
        if not schemas:
            yield spec
        for schema in schemas:
            for leaf in walk(schema, spec.key + "."):
                if leaf.key not in seen:
                    seen.add(leaf.key)
                    yield leaf


@functools.cache
def _by_key() -> dict[str, FieldSpec]:
    return {spec.key: spec for spec in walk()}


def lookup(key: str) -> FieldSpec | None:
    """The declaration of a dotted key (any strategy's keys included), or None."""
    return _by_key().get(key)


def describe(key: str) -> str:
    """What a key takes, in words: 'a whole number or null'."""
    spec = lookup(key)
    if spec is None:
        return "a value"
    return (spec.takes or _words(spec.kind)) + (" or null" if spec.optional else "")


def _words(kind: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text", Any: "a value"}
    if kind in names:
        return names[kind]
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        return "a number" if set(args) == {int, float} else " or ".join(_words(a) for a in args)
    if typing.get_origin(kind) in (list, list) and args:
        return "a list of " + {float: "numbers", int: "whole numbers", str: "names"}.get(args[0], "values")
    return "a section of settings" if dataclasses.is_dataclass(kind) else str(kind)


def unknown_key_fix(key: str) -> str:
    """How to fix an unknown key: the strategy that has it, or the closest key of its section."""
    spec = lookup(key)
    if spec is not None and key.startswith("strategy."):
        option = spec.owner.NAMES[0]  # type: ignore[attr-defined]
        return f"{key} belongs to strategy={option}: select it with strategy={option}"
    section, _, _ = key.rpartition(".")
    prefix = section + "." if section else ""
    names = list(dict.fromkeys(k[len(prefix) :].split(".")[0] for k in _by_key() if k.startswith(prefix)))
    wrong = key[len(prefix) :]
    close = (
        difflib.get_close_matches(wrong, names, n=1, cutoff=0.6)
        or sorted((n for n in names if wrong.startswith(n) or n.startswith(wrong)), key=len)[-1:]
    )
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return f"{hint}{section or 'the root'} holds {', '.join(names)} (docs/configuration.md lists every key)"
