"""Habits CI enforces on the package: ruff's lint rules and mypy (both configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ruff and mypy, installed with the test extras


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_package():
    done = _run("ruff", "check", "fed_dp_lora")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing_in_the_package():
    done = _run("mypy")  # `packages` in pyproject.toml: fed_dp_lora
    assert done.returncode == 0, done.stdout + done.stderr

