"""The institution's own copy of its privacy state, on its own disk (node-config `state-dir`).

`context.state` lives in the SuperNode's memory and is gone when the SuperNode restarts, and a
resumed run is a new Flower run with an empty `context.state`. The ledger is therefore also
written here, before the update leaves the client, one file per study (one output-dir). A
ledger file that exists but cannot be read stops the client: starting again from zero epsilon
would be a false claim.

The last released update is kept too: asked to train a round it already trained on the same
global adapter (the server was stopped before it finished that round), the client sends the
same update again, which reveals nothing new and costs no epsilon.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from fed_dp_lora.privacy.accountant import PrivacyLedger


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ClientStateDir:
    """Ledger, noise key and last release of one institution for one study."""

    def __init__(self, path: str | Path, study: str) -> None:
        self.path = Path(path)
        self.study = study
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LedgerError(f"state-dir {self.path} cannot be created: {err}. Fix: point the node's "
                              "state-dir at a writable directory") from err

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of this state dir (an advisory lock, released if the process dies)."""
        with open(self.path / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def ledger_path(self) -> Path:
        return self.path / f"ledger-{self.study}.json"

    @property
    def release_path(self) -> Path:
        return self.path / f"release-{self.study}.safetensors"

    def load_ledger(self) -> PrivacyLedger | None:
        """The stored ledger, None if this study never trained here; LedgerError if unreadable."""
        path = self.ledger_path
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("study") != self.study:
                raise ValueError(f"it belongs to study {data.get('study')!r}")
            return PrivacyLedger.from_dict(data["ledger"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {path} exists but cannot be read ({err}). Refusing to train: "
                "starting again from zero epsilon would understate what this institution has spent. "
                "Fix: restore the file from a backup; delete it only if you accept losing the record"
            ) from err

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        """Write the ledger durably (fsync, atomic rename) before any update is released."""
        payload = json.dumps({"study": self.study, "ledger": ledger.to_dict()}, indent=1).encode()
        try:
            _write_atomic(self.ledger_path, payload)
        except OSError as err:
            raise LedgerError(f"privacy ledger {self.ledger_path} cannot be written: {err}. Refusing to "
                              "release an update whose cost is not on record") from err

    def secret(self) -> bytes:
        """This institution's noise key (created on first use, never sent anywhere)."""
        path = self.path / "noise.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != 32:
                raise LedgerError(f"noise key {path} is damaged ({len(key)} bytes, expected 32). "
                                  "Fix: restore it, or delete it together with this study's ledger") from None
            return key
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key

    def save_release(self, server_round: int, global_digest: str, state: dict[str, torch.Tensor],
                     metrics: dict[str, float]) -> None:
        meta = {"round": str(server_round), "global": global_digest, "metrics": json.dumps(metrics)}
        tmp = self.release_path.with_name(self.release_path.name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.release_path)

    def release(self, server_round: int, global_digest: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The update released for `server_round` from this global adapter, if it was kept."""
        if not self.release_path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(self.release_path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("round") != str(server_round) or meta.get("global") != global_digest:
            return None
        return load_file(str(self.release_path)), json.loads(meta["metrics"])


def reconcile(memory: PrivacyLedger | None, disk: PrivacyLedger | None, where: Path | None) -> PrivacyLedger | None:
    """The longer of the in-memory and on-disk ledgers, which must agree on their common part."""
    if memory is None or disk is None:
        return disk if memory is None else memory
    if memory.extends(disk):
        return memory
    if disk.extends(memory):
        return disk
    raise LedgerError(f"privacy ledger {where} disagrees with the one this SuperNode holds in memory. "
                      "Refusing to train. Fix: find out which copy is right and restore it")
