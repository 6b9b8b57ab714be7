"""A real deployment on this machine, timed: Flower's own executor against our warm launcher.

    .venv/bin/python scripts/bench_deployment.py OUT_DIR [--institutions 3] [--rounds 2]
        [--overrides "HYDRA OVERRIDES"] [--modes cold,warm]

Per mode, the deployment docs/deployment.md walks through, on loopback: scripts/deploy/*.sh
(through the helpers of tests/e2e/deployment.py) start a SuperLink with TLS and SuperNode
authentication and one registered SuperNode per institution file, then `flwr run` writes
OUT_DIR/<mode>/summary.json.
"cold" is Flower's own executor (`supernode.sh --cold-start`: a new Python process per message
that imports everything again), "warm" is fed-dp-lora-launcher (a fork of a process that already
imported them, after the app check). Each institution's state dir is OUT_DIR/<mode>/state-<i>.
Ends with scripts/round_times.py's table for the modes and one key=value line with the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.deployment import (  # noqa: E402
    REPO, SCRIPTS, flwr_run_deployment, make_certs, make_key, register, start_deployment_superlink,
    start_supernode, write_tls_connection,
)
from tests.e2e.runtime import _bin  # noqa: E402


def run_mode(mode: str, out: Path, data: Path, institutions: int, overrides: str) -> None:
    """One deployment in `mode`; its summary.json and state dirs end up in `out`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-deployment-{mode}-"))
    certs = make_certs(tmp / "certs")
    link = start_deployment_superlink(tmp / "operator", certs)
    nodes = []
    try:
        write_tls_connection(link.flwr_home, "bench", link.port, certs.ca)
        for i in range(institutions):
            key = tmp / "keys" / f"institution-{i}"
            register(link.flwr_home, "bench", make_key(key), f"institution-{i}")
            state = out / f"state-{i}"
            state.mkdir(parents=True, exist_ok=True)
            nodes.append(start_supernode(tmp / f"node-{i}", link.port, certs.ca, key, data / f"institution-{i}.csv",
                                         state, extra=("--cold-start",) if mode == "cold" else ()))
        proc = flwr_run_deployment(link, "bench", REPO, [f'overrides="{overrides}"', f'output-dir="{out}"'],
                                   timeout=7200)
        (out / "flwr-run.log").write_text(proc.stdout)
        for i, node in enumerate(nodes):
            (out / f"supernode-{i}.log").write_text(node.log())
        if not (out / "summary.json").is_file():
            raise RuntimeError(f"{mode}: no summary.json\n{proc.stdout[-3000:]}")
    finally:
        for node in nodes:
            node.stop()
        link.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overrides", default="", help="Hydra overrides on top of the default task")
    parser.add_argument("--modes", default="cold,warm")
    args = parser.parse_args()
    out = args.out_dir.resolve()
    data = out / "data"
    subprocess.run([_bin("python"), str(SCRIPTS / "export_institutions.py"), str(data), "--institutions",
                    str(args.institutions)], check=True)
    overrides = (f"rounds={args.rounds} strategy.min_available_clients={args.institutions} "
                 f"{args.overrides}").strip()
    modes = args.modes.split(",")
    for mode in modes:
        print(f"== {mode}: {args.institutions} institutions, {overrides}", flush=True)
        run_mode(mode, out / mode, data, args.institutions, overrides)
    command = [_bin("python"), str(ROOT / "scripts" / "round_times.py")]
    for mode in modes:
        command.append(f"{mode}={out / mode}")
        for state in sorted((out / mode).glob("state-*")):
            command += ["--state-dir", str(state)]
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
