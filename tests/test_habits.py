"""Habits CI enforces on the package: ruff's lint rules and mypy (both configured in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ruff and mypy, installed with the test extras


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_package():
    done = _run("ruff", "check", "fed_dp_lora")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_is_formatted():
    done = _run("ruff", "format", "--check", "fed_dp_lora")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # a cold mypy takes ~20 s of the fast tier's 3 minutes; CI runs it
def test_mypy_finds_nothing_in_the_package():
    done = _run("mypy")  # `packages` in pyproject.toml: fed_dp_lora
    assert done.returncode == 0, done.stdout + done.stderr


MAX_FUNCTION_LINES = 50


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (n lines)' for every function of the package longer than `limit`,
    decorators and docstring included."""
    found = []
    for path in sorted((ROOT / "fed_dp_lora").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - start + 1
                if lines > limit:
                    found.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_fifty_lines():
    assert long_functions() == []


def test_the_length_check_sees_long_functions():
    assert long_functions(limit=5), "a limit of 5 lines must flag some function: the walk found none"


# Flower's public API: what these packages export at their top. Deeper modules change without
# notice; only fed_dp_lora/flower_internals.py may import from them.
FLOWER_PUBLIC = {"flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.client.mod",
                 "flwr.common", "flwr.server", "flwr.server.strategy", "flwr.server.workflow"}


def flower_internal_imports() -> list[str]:
    """'path:line module' for every import of a non-public Flower module outside flower_internals.py."""
    found = []
    for path in sorted((ROOT / "fed_dp_lora").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative == "fed_dp_lora/flower_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{relative}:{node.lineno} {m}" for m in modules
                      if (m == "flwr" or m.startswith("flwr.")) and m not in FLOWER_PUBLIC]
    return found


def test_flower_internals_are_imported_in_one_module_only():
    assert flower_internal_imports() == []
