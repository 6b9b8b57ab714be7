"""Many simulated institutions on one machine: peak memory and time per round.

    .venv/bin/python scripts/bench_scale.py [--clients 100] [--fraction 0.1] [--rounds 3] [--overrides "..."]

Runs the default task through `scripts/simulate.sh` (the real Flower simulation runtime, its own
FLWR_HOME and ports, stopped by PID) with `--clients` virtual SuperNodes of which `--fraction` are
sampled each round, while a sampler adds up the resident memory of every process of that run
(the SuperLink, Ray and its workers: all carry the run's FLWR_HOME) twice a second. The base
model is loaded once per worker process and shared by every client that worker runs
(fed_dp_lora/client_data.py), so memory should not grow with the number of institutions.
Ends with one key=value line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MemorySampler(threading.Thread):
    """Peak of the summed RSS of all processes whose environment has this FLWR_HOME."""

    def __init__(self, flwr_home: str) -> None:
        super().__init__(daemon=True)
        self.flwr_home, self.peak, self.peak_single, self.running = flwr_home, 0, 0, True

    def run(self) -> None:
        while self.running:
            total = single = 0
            for proc in psutil.process_iter():
                try:
                    if proc.environ().get("FLWR_HOME") == self.flwr_home:
                        rss = proc.memory_info().rss
                        total, single = total + rss, max(single, rss)
                except psutil.Error:
                    continue
            self.peak, self.peak_single = max(self.peak, total), max(self.peak_single, single)
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sampled = max(1, round(args.clients * args.fraction))
    home = tempfile.mkdtemp(prefix="fdl-scale-")
    out = (args.out or Path(home) / "out").resolve()
    overrides = (f"rounds={args.rounds} strategy.fraction_train={args.fraction} "
                 f"strategy.min_train_clients={max(1, sampled // 2)} strategy.min_available_clients={args.clients} "
                 f"{args.overrides}").strip()
    env = {**os.environ, "FLWR_HOME": home, "NUM_SUPERNODES": str(args.clients), "OUTPUT_DIR": str(out),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    sampler = MemorySampler(home)
    sampler.start()
    started = time.time()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "simulate.sh"), "-c", f'overrides="{overrides}"'],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    sampler.running = False
    sampler.join()
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"no summary.json (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    summary = json.loads(summary_path.read_text())
    rounds = summary["rounds"]
    per_round = [sum(r["timing"][k] for k in ("clients", "aggregate", "evaluate", "save")) for r in rounds]
    trained = [len(r["clients"]) for r in rounds]
    print(f"{args.clients} simulated institutions, {sampled} sampled per round, {len(rounds)} rounds, "
          f"whole run {wall:.0f} s (incl. start-up)")
    print("| round | clients trained | failures | round seconds |\n|---|---|---|---|")
    for r, s in zip(rounds, per_round):
        print(f"| {r['round']} | {len(r['clients'])} | {len(r['failures'])} | {s:.1f} |")
    print(f"peak resident memory of the run: {sampler.peak / 2**30:.2f} GiB in total, largest process "
          f"{sampler.peak_single / 2**30:.2f} GiB")
    print(f"clients={args.clients} sampled={sampled} round_s={statistics.median(per_round):.1f} "
          f"peak_mem_gib={sampler.peak / 2**30:.2f} peak_process_gib={sampler.peak_single / 2**30:.2f} "
          f"trained_per_round={statistics.median(trained):.0f} wall_s={wall:.0f}")


if __name__ == "__main__":
    main()
