"""Where a round's time goes: the server's timing in summary.json and each institution's own log.

    .venv/bin/python scripts/round_times.py simulation=outputs/sim deployment=outputs/dep \
        [--state-dir DIR]... [--doc docs/deployment.md]

Per run, medians over rounds from round 2 on (round 1 also pays for the noise calibration).
The server's side comes from summary.json: per round, waiting for the clients' replies,
aggregating, central evaluation and writing the adapter. The clients' side (`startup-seconds`:
process start-up and imports, 0 when the process was already warm as in simulation;
`load-seconds`: model and data; `train-seconds`; `serialize-seconds`) comes from each
institution's local log `<state-dir>/rounds.jsonl` (one JSON object per round, with the run's
`study` and `round`), which never leaves the institution. Give the state dirs with --state-dir
(all institutions on one machine, as in tests and benchmarks); a simulation's are found from the
run's study under $FED_DP_LORA_STATE (default ~/.local/state/fed-dp-lora)/simulation/<study>/.
Runs from before the local logs carry these timings in summary.json's client metrics instead.
Clients run in parallel, so their columns do not add up to the round. "Local training share" =
(waiting for clients / round) x (the clients' training seconds / all their seconds). Ends with
one key=value line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fed_dp_lora.experiments.readme import write_section  # noqa: E402

CLIENT_KEYS = ("startup-seconds", "load-seconds", "train-seconds", "serialize-seconds")
SERVER_KEYS = ("clients", "aggregate", "evaluate", "save")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def simulation_state_dirs(study: str) -> list[Path]:
    root = Path(os.environ.get("FED_DP_LORA_STATE", Path.home() / ".local" / "state" / "fed-dp-lora"))
    return sorted((root / "simulation" / study).glob("partition-*"))


def local_log(study: str, state_dirs: list[Path]) -> list[dict]:
    """This study's entries of every given institution's rounds.jsonl."""
    entries = []
    for directory in state_dirs:
        path = Path(directory) / "rounds.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        entries += [e for e in map(json.loads, filter(str.strip, lines)) if e.get("study") == study]
    return entries


def client_entries(summary: dict, state_dirs: list[Path]) -> list[dict]:
    """One dict per client and round with its timings: the local logs, else (older runs) summary.json."""
    study = summary.get("run", {}).get("study")
    local = local_log(study, [*state_dirs, *simulation_state_dirs(study)]) if study else []
    if local:
        return local
    return [{"round": r["round"], **m} for r in summary["rounds"] for m in r["clients"].values()]


def breakdown(summary: dict, clients: list[dict]) -> dict[str, float]:
    rounds = summary["rounds"][1:] if len(summary["rounds"]) > 1 else summary["rounds"]
    kept = {r["round"] for r in rounds}
    clients = [m for m in clients if m.get("round") in kept and not m.get("replayed")]
    out = {"rounds": float(len(rounds))}
    for key in SERVER_KEYS:
        out[key] = _median([float(r["timing"][key]) for r in rounds if key in r.get("timing", {})])
    walls = [sum(float(r["timing"].get(k, 0.0)) for k in SERVER_KEYS) for r in rounds if "timing" in r]
    if not walls:  # a run from before per-round timing: the gaps between rounds' end times
        walls = [b["seconds"] - a["seconds"] for a, b in zip(summary["rounds"], summary["rounds"][1:])]
    out["wall"] = _median(walls)
    for key in CLIENT_KEYS:
        out[key.split("-")[0]] = _median([float(m[key]) for m in clients if key in m])
    busy = sum(float(m.get(k, 0.0)) for m in clients for k in CLIENT_KEYS)
    startup_load = sum(float(m.get(k, 0.0)) for m in clients for k in CLIENT_KEYS[:2])
    out["startup_load_share"] = startup_load / busy if busy else float("nan")
    out["train_share_of_clients"] = sum(float(m.get("train-seconds", 0.0)) for m in clients) / busy if busy else float("nan")
    out["train_share"] = out["clients"] / out["wall"] * out["train_share_of_clients"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--state-dir", type=Path, action="append", default=[],
                        help="an institution's state dir holding rounds.jsonl, matched to a run by its study "
                             "(repeatable)")
    parser.add_argument("--doc", "--readme", dest="doc", type=Path, default=None,
                        help="rewrite the round-times section of this page (docs/deployment.md)")
    args = parser.parse_intermixed_args()
    lines = ["| run | rounds | round (s) | waiting for clients | aggregate | evaluate | save | client start-up + imports "
             "| model + data load | local training | serialize | start-up + load share of a client's round "
             "| local training share of the round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for item in args.runs:
        label, run_dir = item.split("=", 1)
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        b = breakdown(summary, client_entries(summary, args.state_dir))
        lines.append(f"| {label} | {b['rounds']:.0f} | {b['wall']:.1f} | {b['clients']:.1f} | {b['aggregate']:.2f} | "
                     f"{b['evaluate']:.1f} | {b['save']:.2f} | {b['startup']:.1f} | {b['load']:.1f} | {b['train']:.1f} | "
                     f"{b['serialize']:.3f} | {100 * b['startup_load_share']:.1f}% | {100 * b['train_share']:.0f}% |")
        pairs += [f"{label}_round_s={b['wall']:.1f}", f"{label}_train_share={b['train_share']:.2f}",
                  f"{label}_startup_load_s={b['startup'] + b['load']:.1f}",
                  f"{label}_startup_load_share={b['startup_load_share']:.3f}"]
    body = "\n".join(lines) + "\n"
    print(body)
    if args.doc is not None:
        write_section(args.doc, "round-times", f"Generated by `scripts/round_times.py` from the runs' summary.json "
                      f"and the institutions' local logs:\n\n{body}")
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
