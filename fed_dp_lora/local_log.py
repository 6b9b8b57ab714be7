"""The institution's own log: what a round computed from its records, and why it refused.

The server sees only what reply.py allows. Everything else the institution may want to read
(its training loss, how many records it used or dropped, how long the round took, the detail
of a refusal) is written here. It goes to the ClientApp's console (the SuperNode's terminal)
and, when the node has a state dir, to `<state-dir>/rounds.jsonl`, one JSON object per event.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

FILE = "rounds.jsonl"


def _append(state_dir: str | Path | None, entry: dict[str, Any]) -> None:
    if state_dir is None:
        return
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.time(), **entry}) + "\n")


def round_done(state_dir: str | Path | None, entry: dict[str, Any]) -> None:
    """One line per trained (or replayed) round: study, round, loss, records used, timings."""
    _append(state_dir, {"event": "round", **entry})
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}
    log(INFO, "fed-dp-lora (local only, not sent): %s", shown)


def refused(state_dir: str | Path | None, code: int, detail: str, context: dict[str, Any]) -> None:
    """Why this institution refused a round; the server got only the code and a fixed text."""
    _append(state_dir, {"event": "refused", "code": code, "detail": detail, **context})
    log(WARNING, "fed-dp-lora refused a round (code %d; the server sees only a fixed text): %s", code, detail)


def read(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of an institution's log (for operators' tools and tests)."""
    path = Path(state_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
