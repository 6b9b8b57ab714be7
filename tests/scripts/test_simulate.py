"""scripts/simulate.sh ends honestly: a refused or failed run exits non-zero with one line naming
the key or file and the fix, and never announces outputs it did not write.

Each run has its own FLWR_HOME and free ports, so it never meets anybody's local SuperLink; the
script stops the SuperLink it started.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]


def simulate(tmp_path: Path, overrides: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "OUTPUT_DIR": str(tmp_path / "out"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "NUM_SUPERNODES": "2"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "-c", f'overrides="{overrides}"'],
                          env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("overrides, key", [
    ("privacy.epsilon=-1", "privacy.epsilon"),
    ("data=file data.path={csv}", "data.labels"),  # a CSV run needs its class names
    ("lora.rank=4", "lora.rank"),  # a key the schema does not have
    ("lora.r=abc", "lora.r"),  # a value of the wrong type
])
def test_a_refused_configuration_ends_with_one_line_before_the_run_starts(tmp_path, overrides, key):
    csv = tmp_path / "records.csv"
    csv.write_text("text,label\nsome words,yes\nother words,no\n")
    proc = simulate(tmp_path, overrides.format(csv=csv), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [last_line(proc.stderr)]  # exactly one line
    assert last_line(proc.stderr).startswith(f"error: {key}:") and "Fix:" in last_line(proc.stderr)
    assert "Outputs:" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "flwr-home" / "local-superlink").exists()  # nothing was started


@pytest.mark.e2e
def test_a_run_that_fails_on_the_server_exits_1_naming_the_file(tmp_path):
    """Passes the checks, then the ServerApp cannot read its data: `flwr run` itself exits 0."""
    missing = tmp_path / "missing.csv"
    proc = simulate(tmp_path, f"+preset=tiny data=file data.path={missing} data.labels=[yes,no]", timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("error: run ") and f"DataError: data file {missing} does not exist. Fix:" in line
    assert "Outputs:" not in proc.stdout
