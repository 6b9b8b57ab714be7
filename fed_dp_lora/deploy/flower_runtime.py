"""What the launcher changes in Flower 1.41's runtime, and why (the names come from flower_internals.py).

Why we touch them: with `flower-supernode --isolation process` the SuperNode leaves ClientApp
tasks to whatever polls its Runtime API; Flower's poller (`flower-superexec`) starts a fresh
`flwr-clientapp` process per message, which imports torch, transformers, PEFT and Opacus again
every round, and it offers no hook to check the app bundle before the bundle's code is imported
(see app_check.py for why `--trusted-entities` cannot be used). So:

1. `serve` runs Flower's own SuperExec loop (`run_superexec`: task acquisition, auth, signals)
   with our `ForkExecutor`. Flower's Executor protocol is public, but `run_superexec` only builds
   its own executors (`get_executor`), so we replace that one name in its module.
2. The executor forks the warm launcher once per task; the child runs Flower's own
   `run_clientapp` (pull the task, run the app, push the reply and the context, heartbeats), with
   the two names it uses to unpack and to import the app replaced by our checked versions.
3. The SuperNode hands out a task before it has downloaded the message from the SuperLink. A
   cold process found it there after its imports; a warm child asks at once, and Flower's
   backoff (1, 2, 4, 8, 10 s between tries) then idles for seconds after the message arrived.
   The child polls the SuperNode (loopback) every 0.05-0.5 s instead, for as long in total.

Children run side by side, as Flower's own processes do: a task whose message never fully arrived
(a run stopped mid-transfer) waits in Flower's object pull and must not hold up the next run. The
privacy ledger's flock in the state dir (privacy/ledger_store.py) makes an institution's rounds
run one after another, each in its own fresh process. Pinned to flwr 1.41 (pyproject.toml);
re-read these modules on any upgrade.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, NoReturn

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from fed_dp_lora.deploy.app_check import AppPolicy, Verdict
from fed_dp_lora.flower_internals import (
    ExecutionSpec,
    LaunchResult,
    TaskIdentity,
    TaskType,
    flower_clientapp,
    flower_exit_handlers,
    flower_superexec,
    validate_and_resolve_root_certificates,
)
from fed_dp_lora.reply import REFUSAL_TEXT, Refusal

# The one text the server sees for a refused bundle; the differences stay in the local log.
APP_REFUSED = REFUSAL_TEXT[Refusal.APP]
PACKAGE = "fed_dp_lora"
QUICK_PULL: dict[str, Any] = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": 15_000}  # see 3.


class RefusingApp(ClientApp):
    """Stands in for an unverified app: answers with the fixed refusal, runs none of its code."""

    def __call__(self, message: Message, context: Context) -> Message:
        return Message(Error(code=int(Refusal.APP), reason=APP_REFUSED), reply_to=message)


def write_audit(path: Path | None, verdict: Verdict) -> None:
    """One JSON line per task in the institution's local log: which bundle, and what was decided."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": _run_id(), **verdict.to_dict()}
    level = INFO if verdict.accepted else ERROR
    log(
        level,
        "fed-dp-lora launcher: app %s %s (run %s)%s",
        verdict.fab_hash[:12],
        f"accepted ({verdict.source})" if verdict.accepted else "REFUSED",
        entry["run_id"],
        "" if verdict.source == "installed" else ": " + "; ".join(verdict.problems[:5]),
    )
    if path is not None:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")


def _run_id() -> int | None:
    try:
        return int(TaskIdentity.run_id)
    except Exception:  # not set: the task input was not pulled
        return None


def _forget_installed_package() -> None:
    """A pinned bundle brings its own fed_dp_lora: drop the installed one from this process."""
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def route_app_loading(policy: AppPolicy, audit_log: Path | None) -> None:
    """In a task's child: check the bundle where Flower would unpack it, load what the check allows."""
    decided: dict[str, Verdict] = {}
    flower_install = flower_clientapp.install_from_fab
    flower_loader = flower_clientapp.get_load_client_app_fn

    def install_from_fab(fab_file: bytes, *args, **kwargs):
        verdict = decided["verdict"] = policy.check(fab_file)
        write_audit(audit_log, verdict)
        if verdict.source != "pinned":
            return None  # refused: nothing unpacked; installed: the reviewed copy is already imported
        _forget_installed_package()
        return flower_install(fab_file, *args, **kwargs)

    def get_load_client_app_fn(*args, **kwargs) -> Callable[[str, str, str], ClientApp]:
        load_from_bundle = flower_loader(*args, **kwargs)

        def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
            verdict = decided.get("verdict")
            if verdict is None or not verdict.accepted:
                return RefusingApp()
            if verdict.source == "installed":
                module, _, attribute = policy.clientapp_ref.partition(":")
                return getattr(importlib.import_module(module), attribute)
            return load_from_bundle(fab_id, fab_version, fab_hash)

        return load

    flower_clientapp.install_from_fab = install_from_fab  # type: ignore[assignment]  # same call, no install
    flower_clientapp.get_load_client_app_fn = get_load_client_app_fn


def fresh_process_rng() -> None:
    """Seed the global random generators from the OS, as a new process would have them.

    A forked child inherits the launcher's generator states, so every task would draw the same
    numbers. Python's `random` reseeds itself at fork; torch's and numpy's global generators do
    not. DP noise and sampling use their own keyed generators (privacy/streams.py), but no code
    path should ever see a stream that repeats across rounds.
    """
    import numpy as np
    import torch

    torch.seed()
    np.random.seed()


def run_task(spec: ExecutionSpec, policy: AppPolicy, audit_log: Path | None) -> NoReturn:
    """The forked child: Flower's run_clientapp for one task, then exit without the parent's cleanup."""
    code = 1
    try:
        flower_exit_handlers.registered_exit_handlers.clear()  # the launcher's, not this task's
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        fresh_process_rng()
        route_app_loading(policy, audit_log)
        flower_clientapp.pull_and_inflate_object_from_tree = partial(
            flower_clientapp.pull_and_inflate_object_from_tree, **QUICK_PULL
        )
        flower_clientapp.run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as done:  # run_clientapp always ends in flwr_exit
        code = done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # noqa: BLE001 - a child must never return into the launcher
        log(ERROR, "fed-dp-lora launcher: task %d failed: %r", spec.task_id, err)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkExecutor:
    """Flower's Executor protocol: one forked, already warm child per ClientApp task."""

    def __init__(self, policy: AppPolicy, audit_log: Path | None) -> None:
        self.policy = policy
        self.audit_log = audit_log
        self.children: dict[int, int] = {}  # pid -> task id

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[TaskType], set[str]]:
        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, **_: object) -> None:
        """No capacity limit, as with Flower's SubprocessExecutor."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the fed-dp-lora launcher runs ClientApp tasks only, not {spec.task_type}")
        pid = os.fork()
        if pid == 0:
            run_task(spec, self.policy, self.audit_log)
        self.children[pid] = spec.task_id
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid, task_id in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del self.children[pid]
                code = os.waitstatus_to_exitcode(status)
                log(INFO if code == 0 else WARNING, "fed-dp-lora launcher: task %d ended (exit %d)", task_id, code)

    def close(self) -> None:
        """Children stop by themselves: each watches the launcher's PID (Flower's parent monitor)."""


def serve(
    executor: ForkExecutor,
    runtime_api_address: str,
    *,
    insecure: bool,
    root_certificates_path: str | None,
    superexec_auth_secret: bytes | None,
    parent_pid: int | None,
) -> None:
    """Flower's SuperExec loop with our executor; returns only through Flower's exit (a signal)."""
    flower_superexec.get_executor = lambda *args, **kwargs: executor
    flower_superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        superexec_auth_secret=superexec_auth_secret,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )
