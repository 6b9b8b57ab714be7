"""Institution names: the registered name of each node, unique, never the report's own "server"."""

from __future__ import annotations

import pytest
from flwr.proto.node_pb2 import NodeInfo

from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.strategies.names import NodeNames


class RegistryGrid(InProcessGrid):
    """An in-process grid whose nodes carry names, as the SuperLink's GetNodes returns them."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__({nid: None for nid in names})
        self.names = names

    def get_nodes(self):
        return [NodeInfo(node_id=nid, name=name) for nid, name in self.names.items()]


def test_registered_names_replace_node_ids_and_unnamed_nodes_keep_theirs():
    names = NodeNames()
    names.refresh(RegistryGrid({11: "bank-a", 12: "", 13: "clinic-b"}))
    assert [names.of(n) for n in (11, 12, 13, 14)] == ["bank-a", "node-12", "clinic-b", "node-14"]
    assert names.table() == {"bank-a": 11, "clinic-b": 13}


def test_a_name_given_twice_or_reserved_gets_the_node_id():
    names = NodeNames()
    names.refresh(RegistryGrid({1: "bank", 2: "bank", 3: "server"}))
    assert [names.of(n) for n in (1, 2, 3)] == ["bank (node-1)", "bank (node-2)", "server (node-3)"]
    names.refresh(RegistryGrid({1: "bank"}))  # node 2 went offline: node 1 keeps the same name
    assert names.of(1) == "bank (node-1)"


def test_a_node_that_went_offline_keeps_its_name():
    names = NodeNames()
    names.refresh(RegistryGrid({1: "bank-a", 2: "bank-b"}))
    names.refresh(RegistryGrid({2: "bank-b"}))  # GetNodes lists online nodes only
    assert names.of(1) == "bank-a"


def test_a_grid_without_registry_names_gives_node_ids():
    names = NodeNames()
    names.refresh(InProcessGrid({5: None}))  # Flower's Grid.get_nodes: ids only
    assert names.of(5) == "node-5" and names.table() == {}


class LateGrid(RegistryGrid):
    """Node 2 registers and connects while the strategy waits for min_available_nodes: the
    first count of the nodes online sees node 1 alone."""

    def __init__(self) -> None:
        super().__init__({1: "bank-a", 2: "bank-b"})
        self.online = [1]

    def get_node_ids(self):
        online, self.online = self.online, [1, 2]
        return online

    def get_nodes(self):
        return [n for n in super().get_nodes() if n.node_id in self.online]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("strategy", ["fedavg", "dp-fedavg"])
def test_a_node_that_connects_during_the_wait_is_asked_and_named(make_cfg, strategy):
    from flwr.app import ArrayRecord, ConfigRecord

    from fed_dp_lora.strategies import build_strategy

    strat = build_strategy(make_cfg(f"strategy={strategy}", "strategy.min_available_clients=2"))
    grid = LateGrid()
    messages = list(strat.configure_train(1, ArrayRecord({}), ConfigRecord({}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    assert strat.names.of(2) == "bank-b"
