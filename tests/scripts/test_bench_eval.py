"""scripts/bench_eval.py: runs end to end on a few records and ends with its key=value line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_eval.py"


@pytest.mark.slow  # the benchmark script in a fresh interpreter: imports dominate, a full-tier check
def test_times_every_size_checks_the_metrics_agree_and_ends_with_key_values(tiny_models):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--records", "24", "--repeats", "1", "--sizes", "8",
                           "--overrides", f"+preset=tiny {tiny_models.classifier[0]}"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "check  every batch size gives the same metrics" in done.stdout
    assert [ln.split(" |")[0] for ln in lines if ln.startswith("| ") and ln[2].isdigit()] == \
        ["| 8", "| 32 (auto on CPU)", "| 256"]
    pairs = dict(token.split("=", 1) for token in lines[-1].split())
    assert pairs["records"] == "24" and pairs["auto_batch"] == "32"
    assert float(pairs["auto_vs_256_time"]) > 0 and pairs["fastest_batch"] in {"8", "32", "256"}
