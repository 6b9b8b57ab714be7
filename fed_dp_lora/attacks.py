"""Simulated malicious clients: what a broken or hostile institution sends instead of its update.

Applied after local training, on plain tensors, so the server receives the attack through the
same wire and checks as an honest update. Which clients are malicious is fixed by the config
(the first round(fraction * num-partitions) partition ids), so a run is reproducible and the
report can name them; the server never uses that knowledge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig


def malicious_partitions(fraction: float, num_partitions: int) -> list[int]:
    """Partition ids that attack: the first round(fraction * num_partitions)."""
    return list(range(int(round(fraction * num_partitions))))


def is_malicious(cfg: DictConfig, node_config: Mapping[str, Any]) -> bool:
    """Only simulated clients (with a partition id) can be made malicious by config."""
    if float(cfg.attack.fraction) == 0.0 or "partition-id" not in node_config:
        return False
    part, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    return part in malicious_partitions(float(cfg.attack.fraction), total)


def attack(
    kind: str,
    global_state: Mapping[str, torch.Tensor],
    local_state: Mapping[str, torch.Tensor],
    scale: float,
) -> dict[str, torch.Tensor]:
    """The adapter a malicious client sends instead of `local_state`.

    sign-flip: global - scale * (local - global), the update reversed and amplified;
    gaussian: global + N(0, scale^2) per coordinate, no training signal;
    constant: global + scale in every coordinate, a large update of fixed direction;
    non-finite: the local adapter with a NaN and an Inf in every tensor; wrong-shape: the first tensor loses a row.
    """
    keys = list(local_state)
    if kind == "sign-flip":
        return {k: global_state[k] - scale * (local_state[k] - global_state[k]) for k in keys}
    if kind == "gaussian":
        return {k: global_state[k] + scale * torch.randn_like(global_state[k]) for k in keys}
    if kind == "constant":
        return {k: global_state[k] + scale for k in keys}
    if kind == "non-finite":
        out = {k: v.clone() for k, v in local_state.items()}
        for v in out.values():
            v.view(-1)[0] = float("nan")
            v.view(-1)[-1] = float("inf")
        return out
    if kind == "wrong-shape":
        out = dict(local_state)
        out[keys[0]] = local_state[keys[0]][:-1].clone()
        return out
    raise ValueError(f"unknown attack kind {kind!r}")
