"""The experiment tracker: TensorBoard event files, written offline next to the run's outputs.

TensorBoard needs no server or account and its files are plain local files, so it works on
an air-gapped institution's machine; `tensorboard --logdir <output-dir>/tensorboard` shows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Tracker:
    """No tracking (tracking.backend=none): every call does nothing."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's resolved configuration."""

    def log_round(self, entry: dict[str, Any]) -> None:
        """One finished round of RunReport.rounds."""

    def close(self) -> None:
        """Flush what was logged."""


class TensorBoardTracker(Tracker):
    """Per-round metrics, per-client epsilon and bytes as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_round(self, entry: dict[str, Any]) -> None:
        step = int(entry["round"])
        for key, value in entry.get("metrics", {}).items():
            self.writer.add_scalar(f"eval/{key}", float(value), step)
        for client, eps in entry.get("epsilon", {}).items():
            self.writer.add_scalar(f"epsilon/{client}", float(eps), step)
        self.writer.add_scalar("bytes/up", entry["bytes"]["up"], step)
        self.writer.add_scalar("bytes/down", entry["bytes"]["down"], step)
        self.writer.add_scalar("clients/trained", len(entry["clients"]), step)
        self.writer.add_scalar("clients/failed", len(entry["failures"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(backend: str, out_dir: Path) -> Tracker:
    if backend == "tensorboard":
        return TensorBoardTracker(out_dir / "tensorboard")
    return Tracker()
