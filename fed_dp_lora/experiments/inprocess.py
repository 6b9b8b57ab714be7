"""A whole federation in one process: the real ServerApp and ClientApp, no runtime.

The sweep and the strategy tests run hundreds of short federations; starting a SuperLink
and Ray for each would cost more than the training. Here a Grid subclass hands each
message straight to the ClientApp with a per-node Context kept across rounds (as the
runtime does), so every cell goes through the same code as `flwr run .`. The e2e tests
keep the real runtime covered.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

Handler = Callable[[Message], Message]


class InProcessGrid(Grid):
    """A Grid whose nodes are handlers in this process; keeps every message and reply."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.sent.append(msg)
            message_id = f"msg-{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do on push
            # A copy, as the runtime's serialization gives every node its own: SecAgg+'s workflow
            # sends one RecordDict object to all nodes and secaggplus_mod edits it in place.
            self._pending[message_id] = self.handlers[msg.metadata.dst_node_id](copy.deepcopy(msg))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._pending.pop(i) for i in message_ids]
        self.replies.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))


def client_grid(
    run_config: dict[str, Any],
    num_clients: int,
    first_node_id: int = 1000,
    grid_class: Callable[[dict[int, Handler]], InProcessGrid] = InProcessGrid,
) -> InProcessGrid:
    """Nodes running the real ClientApp on partitions 0..num_clients-1 of the configured data."""
    from fed_dp_lora.client_app import app as client_app

    def node(i: int) -> Handler:
        context = Context(
            run_id=1,
            node_id=first_node_id + i,
            node_config={"partition-id": i, "num-partitions": num_clients},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        return lambda msg: client_app(msg, context)

    return grid_class({first_node_id + i: node(i) for i in range(num_clients)})


def run_federation(
    overrides: str,
    num_clients: int,
    output_dir: Path,
    resume: bool = False,
    grid_class: Callable[[dict[int, Handler]], InProcessGrid] = InProcessGrid,
) -> dict[str, Any]:
    """Run the ServerApp against in-process clients; returns the run's summary.json.

    Each call is a new run (fresh client contexts), as a restarted `flwr run` is.
    """
    from fed_dp_lora.flower_internals import Run, TaskIdentity
    from fed_dp_lora.server_app import main

    # Messages built outside the runtime take their ids from TaskIdentity (internal API).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_config: dict[str, bool | float | int | str] = {
        "overrides": overrides,
        "output-dir": str(Path(output_dir).resolve()),
        "resume": resume,
    }
    grid = client_grid(run_config, num_clients, grid_class=grid_class)
    grid.set_run(Run.create_empty(run_id=1))  # the legacy (SecAgg+) workflow reads grid.run.run_id
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return json.loads((Path(output_dir) / "summary.json").read_text())
