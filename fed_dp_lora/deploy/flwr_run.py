"""`flwr run --stream` with an honest ending: exit 0 only for a run that completed.

    python -m fed_dp_lora.deploy.flwr_run APP [CONNECTION] [flwr run options, e.g. -c ...]

`flwr run` exits 0 even when the ServerApp crashed or refused its configuration, or the run was
stopped (Flower 1.41); the reason is buried in the streamed log. This wrapper:
1. composes the run configuration as the ServerApp will (pyproject defaults + `-c` overrides)
   and refuses a bad one at once (the checks the ServerApp makes before reading any data), with
   fed-dp-lora's one-line error, before anything starts;
2. streams `flwr run APP CONNECTION --stream ...` unchanged;
3. asks the SuperLink how the run ended (`flwr ls --run-id`), reads summary.json when the
   output dir is on this machine, and ends with ONE line: where the outputs are (exit 0), or why
   the run failed or stopped and what to do (exit 1). Exit 2: refused before it started.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

from fed_dp_lora.config import ConfigError, load_config
from fed_dp_lora.data import label_names
from fed_dp_lora.flower_internals import parse_config_args

STARTED = re.compile(r"Successfully started run (\d+)")
# The exception line that ends a traceback, e.g. "fed_dp_lora.config.ConfigError: data.labels: ...".
EXCEPTION = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


@dataclass
class Outcome:
    code: int
    line: str


def run_config(app: Path, flwr_args: list[str]) -> dict:
    """The run config the ServerApp will see: the app's defaults, then every -c / --run-config."""
    defaults = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
    overrides = [flwr_args[i + 1] for i, a in enumerate(flwr_args[:-1]) if a in ("-c", "--run-config")]
    return {**defaults, **parse_config_args(overrides)}


def stream(command: list[str]) -> tuple[int, list[str]]:
    """Run `command`, echoing its output line by line; (exit code, lines)."""
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
    return proc.returncode, lines


def run_status(flwr: str, connection: list[str], run_id: str) -> tuple[str, str]:
    """(status, details) of the run as the SuperLink reports it, e.g. ("finished:failed", "...")."""
    proc = subprocess.run(
        [flwr, "ls", *connection, "--run-id", run_id, "--format", "json"], capture_output=True, text=True, timeout=120
    )
    try:
        run = json.loads(proc.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        said = (proc.stdout + proc.stderr).strip().splitlines()
        return "unknown", f"`flwr ls` could not tell ({said[-1] if said else 'no output'})"
    return str(run.get("status", "unknown")), str(run.get("status-details", "") or "")


def last_error(lines: list[str]) -> str | None:
    """The last exception message in the streamed log (what the ServerApp died of), if any."""
    for line in reversed(lines):
        match = EXCEPTION.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return None


def outcome(status: str, details: str, run_id: str, lines: list[str], out_dir: Path | None) -> Outcome:
    """The one line and exit code for how the run ended."""
    summary_path = out_dir / "summary.json" if out_dir is not None else None
    summary = json.loads(summary_path.read_text()) if summary_path is not None and summary_path.is_file() else None
    if status.endswith(":stopped"):
        return Outcome(
            1,
            f"error: run {run_id} was stopped before it finished. Fix: run the same command with "
            "-c resume=true to continue it from its last completed round",
        )
    if not status.endswith(":completed"):
        reason = last_error(lines) or details or f"the SuperLink reports its status as {status!r}"
        return Outcome(1, f"error: run {run_id} failed: {reason} (full log: flwr log {run_id})")
    if summary is not None and summary["run"].get("stopped"):
        return Outcome(1, f"error: run {run_id} stopped early: {summary['run']['stopped']}. Outputs so far: {out_dir}")
    if out_dir is None:
        return Outcome(0, f"Run {run_id} completed; its outputs are in the output-dir on the SuperLink's machine")
    if summary is None:
        return Outcome(0, f"Run {run_id} completed; its outputs are in {out_dir} on the SuperLink's machine")
    return Outcome(0, f"Outputs: {out_dir} (summary.json, report.html, adapters/round-N)")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    app = Path(args[0]).resolve()
    connection = args[1:2] if len(args) > 1 and not args[1].startswith("-") else []
    flwr_args = args[1 + len(connection) :]
    try:
        config = load_config(run_config(app, flwr_args))
        if config.model.task == "classification":
            label_names(config)  # the class names the ServerApp needs before it reads any data
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(config.output_dir) if config.output_dir else None
    flwr = str(Path(sys.executable).with_name("flwr"))
    code, lines = stream([flwr, "run", str(app), *connection, "--stream", *flwr_args])
    started = next((m.group(1) for m in map(STARTED.search, lines) if m), None)
    if started is None:
        reason = next((ln.strip() for ln in reversed(lines) if ln.strip()), f"flwr run exited {code}")
        print(f"error: the run did not start: {reason}", file=sys.stderr)
        return code or 1
    result = outcome(*run_status(flwr, connection, started), started, lines, out_dir)
    print(result.line, file=sys.stderr if result.code else sys.stdout)
    return result.code


if __name__ == "__main__":
    raise SystemExit(main())
