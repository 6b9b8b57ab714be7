"""The institution's own privacy state, on its own disk (node-config `state-dir`).

`context.state` lives in the SuperNode's memory and is gone when the SuperNode restarts, and a
resumed run is a new Flower run with an empty `context.state`. So the institution's lifetime
ledger (every study, privacy/institution_ledger.py) is also kept here. It is written before an
update leaves the client. A ledger file that exists but cannot be read stops the client:
starting again from zero epsilon would be a false claim.

Also kept here:
- the noise key (never sent);
- a counter of training attempts per study and round, so every attempt draws fresh noise;
- the last released update, so a round asked again on the same global adapter is answered with
  the same release, which reveals nothing new;
- the identity of the one node that owns the directory. Two SuperNodes sharing a state dir
  would share a key and a kept release, and one would send the other's update as its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fed_dp_lora.files import write_atomic
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger, Release, StudyTerms


class LedgerError(RuntimeError):
    """The institution's stored privacy state cannot be trusted; the client must not train."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and bytes of a state dict (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LedgerError(
            f"{what} {path} exists but cannot be read ({err}). Refusing to train. Fix: restore it from a backup"
        ) from err


@dataclass(frozen=True)
class LedgerReceipt:
    """Proof that the ledger holding one round's release is on the institution's disk.

    Made only where the ledger was written (`InstitutionState.save_ledger`) or read back from
    disk (a kept release resent); a reply that carries an epsilon cannot be built without one
    (client_round.Released), so the order "ledger first, then the update" is a rule of the
    types rather than of line order.
    """

    path: Path | None  # None: a client without a state dir, whose ledger lives in memory only
    study: str
    server_round: int

    @classmethod
    def in_memory(cls, ledger: InstitutionLedger, study: str, server_round: int) -> LedgerReceipt:
        """For a client with nowhere to persist (direct calls, tests): the ledger must still hold it."""
        if not ledger.trained(study, server_round):
            raise LedgerError(f"round {server_round} of study {study!r} is not in the ledger; nothing may leave")
        return cls(None, study, server_round)


class InstitutionState:
    """Ledger, noise key, attempts, kept releases and owner of one institution's state dir."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LedgerError(
                f"state-dir {self.path} cannot be created: {err}. Fix: point the node's "
                "state-dir at a writable directory"
            ) from err

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of this state dir (an advisory lock, released if the process dies)."""
        with open(self.path / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def claim(self, node_id: int) -> None:
        """Bind this directory to one node; refuse any other node that is pointed at it."""
        path = self.path / "node.json"
        if not path.exists():
            write_atomic(path, json.dumps({"node-id": int(node_id)}).encode())
            return
        owner = _read_json(path, "state-dir owner file").get("node-id")
        if owner != int(node_id):
            raise LedgerError(
                f"state-dir {self.path} belongs to node {owner}, and node {node_id} was "
                "started with it. Refusing: two SuperNodes must never share a state dir (they "
                "would share a noise key and a kept update). Fix: give this SuperNode its own "
                "--state-dir"
            )

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.json"

    def load_ledger(self) -> InstitutionLedger | None:
        """The lifetime ledger, None if this institution never trained; LedgerError if unreadable."""
        if not self.ledger_path.exists():
            return self._migrate_study_ledgers()
        data = _read_json(self.ledger_path, "privacy ledger")
        try:
            return InstitutionLedger.from_dict(data["ledger"])
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {self.ledger_path} exists but cannot be read ({err}). Refusing to train: "
                "starting again from zero epsilon would understate what this institution has spent. "
                "Fix: restore the file from a backup; delete it only if you accept losing the record"
            ) from err

    def save_ledger(self, ledger: InstitutionLedger, study: str, server_round: int) -> LedgerReceipt:
        """Write the ledger durably (fsync, atomic rename) before any update is released; the
        receipt names the round it covers, which the ledger must hold."""
        if not ledger.trained(study, server_round):
            raise LedgerError(f"round {server_round} of study {study!r} is not in the ledger being saved")
        self._write_ledger(ledger)
        return LedgerReceipt(self.ledger_path, study, server_round)

    def _write_ledger(self, ledger: InstitutionLedger) -> None:
        payload = json.dumps({"ledger": ledger.to_dict()}, indent=1).encode()
        try:
            write_atomic(self.ledger_path, payload)
        except OSError as err:
            raise LedgerError(
                f"privacy ledger {self.ledger_path} cannot be written: {err}. Refusing to "
                "release an update whose cost is not on record"
            ) from err

    def receipt_on_disk(self, study: str, server_round: int) -> LedgerReceipt:
        """The receipt for a round the ledger on disk already holds (a kept release resent)."""
        ledger = self.load_ledger()
        if ledger is None or not ledger.trained(study, server_round):
            raise LedgerError(f"round {server_round} of study {study!r} is not in {self.ledger_path}")
        return LedgerReceipt(self.ledger_path, study, server_round)

    def _migrate_study_ledgers(self) -> InstitutionLedger | None:
        """Fold the per-study ledgers of earlier versions (ledger-<study>.json) into one."""
        old = sorted(self.path.glob("ledger-*.json"))
        if not old:
            return None
        ledger = InstitutionLedger()
        for path in old:
            data = _read_json(path, "privacy ledger")
            try:
                study, entry = str(data["study"]), data["ledger"]
                rows = list(zip(entry["noise"], entry["rate"], entry["steps"], entry["rounds"], strict=True))
                ledger.studies[study] = StudyTerms(
                    float(entry["delta"]), str(entry["accountant"]), float(rows[-1][0]) if rows else 0.0
                )
                ledger.releases += [Release(study, int(r), float(n), float(q), int(k)) for n, q, k, r in rows]
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise LedgerError(
                    f"privacy ledger {path} cannot be read ({err}). Refusing to train. Fix: restore it from a backup"
                ) from err
        self._write_ledger(ledger)
        for path in old:
            path.rename(path.with_name(path.name + ".migrated"))
        return ledger

    def secret(self) -> bytes:
        """This institution's noise key (created on first use, never sent anywhere)."""
        path = self.path / "noise.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != 32:
                raise LedgerError(
                    f"noise key {path} is damaged ({len(key)} bytes, expected 32). Fix: restore it from a backup"
                ) from None
            return key
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key

    def next_attempt(self, study: str, server_round: int) -> int:
        """Count one more training attempt for (study, round), durably, before training starts.

        The attempt number seeds the round's noise: a round trained again (on another global
        adapter, or after a crash) never reuses a draw, so no two releases cancel each other's noise.
        """
        path = self.path / "attempts.json"
        counts = _read_json(path, "attempt counter") if path.exists() else {}
        key = f"{study}/{int(server_round)}"
        counts[key] = int(counts.get(key, 0)) + 1
        write_atomic(path, json.dumps(counts, indent=1).encode())
        return counts[key]

    def _release_path(self, study: str) -> Path:
        return self.path / f"release-{study}.safetensors"

    def save_release(
        self,
        study: str,
        server_round: int,
        global_digest: str,
        state: dict[str, torch.Tensor],
        metrics: dict[str, float],
    ) -> None:
        meta = {"round": str(server_round), "global": global_digest, "metrics": json.dumps(metrics)}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        write_atomic(self._release_path(study), save(tensors, metadata=meta))

    def release(
        self, study: str, server_round: int, global_digest: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The update released for `server_round` from this global adapter, if it was kept."""
        path = self._release_path(study)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("round") != str(server_round) or meta.get("global") != global_digest:
            return None
        return load_file(str(path)), json.loads(meta["metrics"])


def reconcile(
    memory: InstitutionLedger | None, disk: InstitutionLedger | None, where: Path | None
) -> InstitutionLedger | None:
    """The longer of the in-memory and on-disk ledgers, which must agree on their common part."""
    if memory is None or disk is None:
        return disk if memory is None else memory
    if memory.extends(disk):
        return memory
    if disk.extends(memory):
        return disk
    raise LedgerError(
        f"privacy ledger {where} disagrees with the one this SuperNode holds in memory. "
        "Refusing to train. Fix: find out which copy is right and restore it"
    )
