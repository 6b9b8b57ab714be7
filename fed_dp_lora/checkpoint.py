"""The server's state after each completed round, so a stopped run can continue.

`<output-dir>/checkpoint.pt` holds the global adapter, the round counter, the strategy's state
(e.g. adaptive clip norm, user-level ledger, its noise RNG), the report so far and the Python
RNG that Flower samples clients with. It is replaced atomically after a round's outputs are
written, so it always describes a finished round: a resumed run starts at the next one and no
round is run (or counted in any epsilon) twice on the server. Clients keep their own ledgers
(privacy/ledger_store.py).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fed_dp_lora.config import ConfigError
from fed_dp_lora.files import write_atomic

FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    study: str
    completed_round: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    report: dict[str, Any]
    python_rng: Any
    audit: dict[str, Any] | None = None  # the release audit's scores so far (audit.release)

    def restore_rng(self) -> None:
        random.setstate(self.python_rng)


def new_study() -> str:
    """An id for one federated training run across restarts (keys the clients' ledgers)."""
    return uuid.uuid4().hex[:16]


def save(out: Path, checkpoint: Checkpoint) -> Path:
    return write_atomic(out / FILE, lambda handle: torch.save(asdict(checkpoint), handle))


def load(out: Path) -> Checkpoint | None:
    path = out / FILE
    if not path.exists():
        return None
    try:
        data = torch.load(path, weights_only=True)
        return Checkpoint(**data)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise ConfigError(
            f"resume: {path} cannot be read ({err}). Fix: restore it, or start a new run in a new output-dir"
        ) from err


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_point(out: Path, config: dict[str, Any], resume: bool) -> Checkpoint | None:
    """The checkpoint to continue from, or None for a fresh run; refuses every mix-up.

    A fresh run into a directory that holds one, a resume with nothing to resume, and a resume
    with a different configuration would all make the outputs or the epsilons wrong.
    """
    checkpoint = load(out)
    if not resume:
        if checkpoint is not None:
            raise ConfigError(
                f"output-dir {out} already holds a run ({checkpoint.completed_round} of "
                f"{checkpoint.config['rounds']} rounds done). Fix: add -c resume=true to continue it, "
                "or choose a new output-dir"
            )
        return None
    if checkpoint is None:
        raise ConfigError(
            f"resume: {out} has no {FILE}, so there is nothing to resume. Fix: check "
            "output-dir, or start the run without resume=true"
        )
    before, now = _flat(checkpoint.config), _flat(config)
    changed = sorted(
        k for k in set(before) | set(now) if k not in ("resume", "output_dir") and before.get(k) != now.get(k)
    )
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"resume: the configuration differs from the stopped run's ({detail}). Fix: "
            "resume with the same overrides as the original run"
        )
    return checkpoint
