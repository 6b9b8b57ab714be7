"""Institution names for summary.json, the report and the logs, instead of bare node ids.

In deployment an institution's name is the one the operator gave its key at registration
(`scripts/deploy/register.sh CONNECTION KEY.pub NAME`): the SuperLink stores it with the node and
Flower's `grid.get_nodes()` returns it. An unregistered node (an `--insecure` test SuperLink) is
named by what it declares (node-config `name`, sent as public metadata), marked as declared, else
`node-<id>`; a simulated client is `client-<partition-id>`.
A name given to two nodes, or one that would clash with the report's own "server" entry, gets
the node id appended.
"""

from __future__ import annotations

from collections import Counter

from flwr.app import Message
from flwr.serverapp import Grid

from fed_dp_lora.reply import NODE_RECORD, PARTITION_ID
from fed_dp_lora.wire import scalar

RESERVED = frozenset({"server"})  # the report's key for the server's own failures


def fallback_name(node_id: int) -> str:
    return f"node-{node_id}"


class NodeNames:
    """node id -> institution name, refreshed from the SuperLink's registry each round."""

    def __init__(self) -> None:
        self.registered: dict[int, str] = {}  # every node seen so far (GetNodes lists online ones only)
        self.names: dict[int, str] = {}

    def refresh(self, grid: Grid) -> None:
        self.registered.update({int(n.node_id): n.name.strip() for n in grid.get_nodes() if n.name.strip()})
        counts = Counter(self.registered.values())
        self.names = {
            nid: name if counts[name] == 1 and name not in RESERVED else f"{name} ({fallback_name(nid)})"
            for nid, name in self.registered.items()
        }

    def of(self, node_id: int) -> str:
        return self.names.get(int(node_id), fallback_name(node_id))

    def of_reply(self, reply: Message, node_id: int | None = None) -> str:
        """client-<partition-id> in simulation, else the registered name, else the declared one."""
        metrics = reply.content.metric_records.get("metrics") if reply.has_content() else None
        if metrics is not None and PARTITION_ID in metrics:
            return f"client-{int(scalar(metrics[PARTITION_ID]))}"
        nid = int(reply.metadata.src_node_id if node_id is None else node_id)
        node = reply.content.config_records.get(NODE_RECORD) if reply.has_content() else None
        if nid not in self.names and node is not None and node.get("name"):
            return f"{node['name']!s} (declared, {fallback_name(nid)})"  # self-named: never taken for a registered one
        return self.of(nid)

    def table(self) -> dict[str, int]:
        """name -> node id, for summary.json (who is who, for the operator)."""
        return {name: nid for nid, name in sorted(self.names.items())}
