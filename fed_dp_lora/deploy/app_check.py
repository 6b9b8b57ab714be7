"""Which app bundles an institution runs: the code it installed, or a bundle whose hash it pinned.

The server chooses the app bundle (FAB) of every run, and a SuperNode runs whatever it is sent.
An institution that reviewed the fed-dp-lora it installed must be able to refuse anything else,
before any of the bundle's code runs. Flower's own check, `flower-supernode --trusted-entities`,
does not work here: it requires `valid_license` in the bundle's verifications, which only the
SuperLink's Flower Hub path sets (flwr/superlink/servicer/control/control_handlers.py,
`_format_verification`); a run started with `flwr run .` carries none, so every such run would be
refused (flwr/supernode/start_client_internal.py, `_pull_and_store_message`).

So the check is ours. A bundle is accepted when
- "installed": its files are exactly the ones this institution would bundle from the code it
  installed (`fed_dp_lora/`, `conf/` and the app's pyproject.toml; byte-identical, nothing extra,
  nothing missing). The launcher then runs the installed, already imported copy, never the
  bundle's files; or
- "pinned": its SHA-256 is in the institution's pinned list (`supernode.sh --pin-app-hash`).
  Then the bundle's own code runs, as Flower would run it.
Anything else is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tomllib

MANIFEST = ".info/CONTENT"  # Flower's list of the bundle's files and hashes: derived, not compared
PYPROJECT = "pyproject.toml"
MAX_UNPACKED_BYTES = 64 * 2**20  # Flower caps a bundle at 10 MB packed; this stops a zip bomb
_HASH = re.compile(r"^[0-9a-f]{64}$")


class AppCheckError(ValueError):
    """The institution's own settings cannot be used (bad pin, no installed app to compare)."""


@dataclass(frozen=True)
class Verdict:
    """What the check decided about one bundle, and why (the why stays in the local log)."""

    fab_hash: str
    source: str | None  # "installed", "pinned", or None: refused
    problems: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.source is not None

    def to_dict(self) -> dict[str, object]:
        return {
            "fab_sha256": self.fab_hash,
            "accepted": self.accepted,
            "source": self.source,
            "differences": list(self.problems),
        }


def bundle_files(fab: bytes) -> dict[str, bytes]:
    """The files of a bundle by path; pyproject.toml as its parsed content (the builder re-writes it)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = archive.namelist()
        if len(names) != len(set(names)):
            raise ValueError("the bundle names a file twice")
        if sum(info.file_size for info in archive.infolist()) > MAX_UNPACKED_BYTES:
            raise ValueError(f"the bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes")
        files = {name: archive.read(name) for name in names if name != MANIFEST and not name.endswith("/")}
    if PYPROJECT in files:
        parsed = tomllib.loads(files[PYPROJECT].decode("utf-8"))
        files[PYPROJECT] = json.dumps(parsed, sort_keys=True).encode()
    return files


def differences(reference: dict[str, bytes], files: dict[str, bytes]) -> list[str]:
    """Every way `files` is not `reference`, one short line each, sorted."""
    out = [f"extra file {p}" for p in sorted(files.keys() - reference.keys())]
    out += [f"missing file {p}" for p in sorted(reference.keys() - files.keys())]
    out += [f"changed file {p}" for p in sorted(reference.keys() & files.keys()) if reference[p] != files[p]]
    return out


def installed_root() -> Path:
    """The project folder of the installed ClientApp module (it holds pyproject.toml and conf/)."""
    spec = importlib.util.find_spec("fed_dp_lora.client_app")  # finds it without importing it
    if spec is None or spec.origin is None:
        raise AppCheckError("fed_dp_lora.client_app is not installed here")
    return Path(spec.origin).resolve().parents[1]


def build_reference(root: Path) -> bytes:
    """The bundle Flower's own builder makes from `root` (what `flwr run` would send from it)."""
    from fed_dp_lora.flower_internals import build_fab_from_disk

    if not (root / PYPROJECT).is_file():
        raise AppCheckError(
            f"no {PYPROJECT} in {root}: install fed-dp-lora from a checkout "
            "(bash scripts/setup.sh) so the launcher has the reviewed code to compare against"
        )
    return build_fab_from_disk(root)


class AppPolicy:
    """An institution's rule for app bundles: its installed code, plus any pinned hashes."""

    def __init__(self, reference_fab: bytes, pinned: Iterable[str] = ()) -> None:
        self.reference = bundle_files(reference_fab)
        self.pinned = frozenset(_pin(h) for h in pinned)
        components = json.loads(self.reference[PYPROJECT])["tool"]["flwr"]["app"]["components"]
        self.clientapp_ref: str = components["clientapp"]

    def check(self, fab: bytes) -> Verdict:
        fab_hash = hashlib.sha256(fab).hexdigest()
        try:
            problems = differences(self.reference, bundle_files(fab))
        except (zipfile.BadZipFile, ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            problems = [f"unreadable bundle: {err}"]
        if not problems:
            return Verdict(fab_hash, "installed")
        return Verdict(fab_hash, "pinned" if fab_hash in self.pinned else None, tuple(problems))


def _pin(value: str) -> str:
    pin = value.strip().lower()
    if not _HASH.match(pin):
        raise AppCheckError(
            f"--pin-app-hash {value!r} is not a SHA-256 hex digest (64 hex characters); get it with: sha256sum APP.fab"
        )
    return pin
