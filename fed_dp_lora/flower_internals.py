"""Every name we import from a Flower module outside its public API, in one place (flwr 1.41).

Flower's public API is what its packages export at the top (`flwr.app`, `flwr.serverapp`,
`flwr.serverapp.strategy`, `flwr.clientapp`, `flwr.client.mod`, `flwr.common`, `flwr.server`,
`flwr.server.strategy`, `flwr.server.workflow`). Everything below lives deeper and may change in
any release: tests/test_habits.py fails if another module of the package imports from such a
module, so an upgrade is checked here, name by name. The launcher's *use* of the runtime
internals (which functions it replaces, and why) stays in deploy/flower_runtime.py; this module
only says where each name comes from and why we need it.

pyproject.toml pins flwr to 1.41.x; re-read each source module below on any upgrade.
"""

from __future__ import annotations

# The launcher (deploy/flower_runtime.py says what it replaces there, and why): Flower's SuperExec
# loop, which we give our forking executor, and the ClientApp runner a forked child runs.
import flwr.supercore.superexec.run_superexec as flower_superexec
import flwr.supernode.runtime.run_clientapp as flower_clientapp

# Flower's bundle builder: the launcher compares a received bundle with one built from its install.
from flwr.cli.build import build_fab_from_disk

# The call signature of a ClientApp mod's `call_next`.
from flwr.clientapp.typing import ClientAppCallable

# `flwr run`'s own parser of -c/--run-config overrides (deploy/flwr_run.py reads the same config).
from flwr.common.config import parse_config_args

# The record a SecAgg+ stage message carries (the ClientApp sends those to Flower's secaggplus_mod).
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

# The legacy FitIns/FitRes <-> RecordDict conversions Flower's SecAgg+ workflow and mod speak.
from flwr.compat.common import recorddict_compat

# The legacy strategy API's client handles (flwr.server exports ClientManager, not ClientProxy).
from flwr.server.client_proxy import ClientProxy

# Multi-Krum's selection, so the report can name the selected clients (MultiKrum.aggregate_train
# does not say whom it chose); the weighted average Flower's strategies apply to the selection;
# the node list the grid reports once enough nodes are connected (DP-FedAvg samples it itself).
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes

# The launcher's executor: Flower's Executor protocol types, its task types, its exit handlers
# (a forked child clears the launcher's), its TLS helper.
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import exit_handler as flower_exit_handlers

# Messages built outside the runtime (in-process grids, the launcher's refusals) take their ids
# from TaskIdentity; the legacy SecAgg+ workflow reads grid.run.run_id, so an in-process grid needs a Run.
from flwr.supercore.run import Run
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.tls import validate_and_resolve_root_certificates

__all__ = [
    "RECORD_KEY_CONFIGS",
    "ClientAppCallable",
    "ClientProxy",
    "ExecutionSpec",
    "LaunchResult",
    "Run",
    "TaskIdentity",
    "TaskType",
    "aggregate_arrayrecords",
    "build_fab_from_disk",
    "flower_clientapp",
    "flower_exit_handlers",
    "flower_superexec",
    "parse_config_args",
    "recorddict_compat",
    "sample_nodes",
    "select_multikrum",
    "validate_and_resolve_root_certificates",
]
