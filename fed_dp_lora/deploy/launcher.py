"""fed-dp-lora-launcher: an institution's warm, checking replacement for `flower-superexec`.

    fed-dp-lora-launcher --runtime-api-address 127.0.0.1:9094 --insecure \
        [--pin-app-hash SHA256 ...] [--audit-log STATE_DIR/app-check.jsonl] \
        [--superexec-auth-secret-file FILE] [--parent-pid PID] [--check]

Started by scripts/deploy/supernode.sh next to `flower-supernode --isolation process`. It
imports the ClientApp's heavy modules (torch, transformers, PEFT, Opacus, fed_dp_lora) once,
then forks one child per ClientApp message: each message still runs in its own fresh process
(nothing of one round stays in memory for the next), but starts warm. Before a child runs any
of the app bundle's code it checks the bundle (app_check.py): the installed code or a pinned
hash, else the task is answered with a fixed refusal and the reason goes to --audit-log.
The Runtime API is the SuperNode's own, on loopback (`--insecure` means plain HTTP to it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import pkgutil
import sys
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.common import log

from fed_dp_lora.deploy.app_check import AppCheckError, AppPolicy, build_reference, installed_root

# Imported at start so that no task pays for them; fed_dp_lora's own modules pull in the rest.
HEAVY_MODULES = ("torch", "transformers", "peft", "opacus", "fed_dp_lora.client_app")


def preload(root: Path) -> tuple[float, list[str]]:
    """Import the heavy modules and every module of the installed fed_dp_lora in `root`;
    (seconds, modules that failed). Only that folder: fed_dp_lora is a namespace package, and
    another copy on sys.path must not be imported."""
    started = time.perf_counter()
    for name in HEAVY_MODULES:
        importlib.import_module(name)
    failed = []
    for module in pkgutil.walk_packages([str(root / "fed_dp_lora")], prefix="fed_dp_lora."):
        try:
            importlib.import_module(module.name)
        except Exception as err:  # an optional extra (e.g. a tracking backend) may be missing
            failed.append(f"{module.name}: {err!r}")
    return time.perf_counter() - started, failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fed-dp-lora-launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", help="the SuperNode's Runtime API, HOST:PORT")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback)")
    tls.add_argument("--root-certificates", help="CA certificate of a TLS Runtime API")
    parser.add_argument(
        "--pin-app-hash",
        action="append",
        default=[],
        metavar="SHA256",
        help="also accept the app bundle with this SHA-256 (repeatable); its own code runs",
    )
    parser.add_argument(
        "--audit-log",
        type=Path,
        default=None,
        help="append one JSON line per task: bundle hash, accepted or refused, differences",
    )
    parser.add_argument(
        "--superexec-auth-secret-file",
        type=Path,
        default=None,
        help="the secret file given to flower-supernode (only this launcher may take tasks)",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    parser.add_argument(
        "--check", action="store_true", help="check these settings, print the installed app's bundle sha256, and exit"
    )
    args = parser.parse_args(argv)
    if not args.check and (args.runtime_api_address is None or not (args.insecure or args.root_certificates)):
        parser.error("give --runtime-api-address and one of --insecure / --root-certificates")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = installed_root()
        reference = build_reference(root)  # before the slow imports: fail fast
        policy = AppPolicy(reference, args.pin_app_hash)
        secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    except (AppCheckError, OSError) as err:
        print(f"fed-dp-lora-launcher: error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(hashlib.sha256(reference).hexdigest())
        return 0
    seconds, failed = preload(root)
    for problem in failed:
        log(WARNING, "fed-dp-lora launcher: could not preload %s", problem)
    log(
        INFO,
        "fed-dp-lora launcher: imports done in %.1f s; runs the app installed in %s (bundle sha256 %s)%s",
        seconds,
        root,
        hashlib.sha256(reference).hexdigest(),
        f" or pinned {sorted(policy.pinned)}" if policy.pinned else "",
    )
    from fed_dp_lora.deploy.flower_runtime import ForkExecutor, serve

    # Flower's SuperExec asks for new tasks every 1 s; on loopback 0.2 s costs nothing and a
    # warm task starts that much sooner.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")

    serve(
        ForkExecutor(policy, args.audit_log),
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
