"""How a configuration field is declared and checked: type, default, help and choices together.

Every group's dataclass declares its fields with :func:`setting` (in the way PEFT's `LoraConfig`
keeps `field(default=..., metadata={"help": ...})`), so the schema Hydra validates against, the
checks and the generated table in docs/configuration.md read the same declaration.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration problem, with the key at fault and how to fix it."""


def setting(default: Any = MISSING, help: str = "", choices: tuple[str, ...] = (), takes: str = "") -> Any:
    """A dataclass field with its help text and, for a closed set of values, its choices.

    `takes` words what the field accepts where its type alone would say too little
    (e.g. `Any` for "a list of names or one regex").
    """
    metadata = {"help": help, "choices": choices, "takes": takes}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise the one-line ConfigError `key: problem. Fix: fix` unless ok."""
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


class Group:
    """Base of every config group's dataclass: its key in the tree and the checks on its fields.

    Subclasses set KEY (e.g. "lora", "audit.release") and extend :meth:`validate` with the checks
    that read only their own fields; rules across groups live in `config/rules.py`.
    """

    KEY: ClassVar[str] = ""

    def key(self, name: str) -> str:
        """The dotted key of one of this group's fields, as a user writes it in an override."""
        return f"{self.KEY}.{name}" if self.KEY else name

    def validate(self) -> None:
        """Check that every field with choices holds one of them."""
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = spec.metadata.get("choices", ())
            value = getattr(self, spec.name)
            require(
                not allowed or value in allowed,
                self.key(spec.name),
                f"unknown value {value!r}",
                f"use one of {', '.join(allowed)}",
            )
