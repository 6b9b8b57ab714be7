"""Simulated malicious clients: what a broken or hostile institution sends instead of its update.

A Flower mod (`attack_mod`) around the ClientApp's train function: the attacker trains and spends
budget like everyone, then replaces the update in the reply, so the server receives the attack
through the same wire and checks as an honest update. Which clients are malicious is fixed by the
config (the first round(fraction * num-partitions) partition ids), so a run is reproducible and
the report can name them; the server never uses that knowledge.

Simulation only: client_app.py imports this module only for a node without a data file of its
own (node_policy.is_simulated), so a deployed institution never loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from omegaconf import DictConfig

from fed_dp_lora.config import load_config
from fed_dp_lora.flower_internals import ClientAppCallable, recorddict_compat
from fed_dp_lora.wire import (
    INT8_UPDATE,
    SECAGG_KEYS,
    UPLOAD_KEY,
    decode_int8_update,
    encode_int8_update,
    is_legacy_fitins,
)


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


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The reply of a simulated attacker: its honest reply with the update replaced by the attack."""
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply
    cfg = load_config(context.run_config)
    if not is_malicious(cfg, context.node_config):
        return reply
    kind, scale = str(cfg.attack.kind), float(cfg.attack.scale)
    if is_legacy_fitins(msg.content):
        reply.content = _attacked_fitres(msg.content, reply.content, kind, scale)
    else:
        reply.content = _attacked_adapter(msg.content, reply.content, kind, scale)
    return reply


def _attacked_adapter(request: RecordDict, content: RecordDict, kind: str, scale: float) -> RecordDict:
    """A plain reply: the adapter (int8 uploads decoded first, encoded again after) replaced."""
    global_arrays = request.array_records["arrays"]
    global_state = global_arrays.to_torch_state_dict()
    int8 = UPLOAD_KEY in content.config_records and content.config_records[UPLOAD_KEY]["encoding"] == INT8_UPDATE
    sent = content.array_records["arrays"]
    local = decode_int8_update(sent, global_arrays) if int8 else sent
    if isinstance(local, str):
        raise ValueError(f"attack_mod: the honest int8 upload cannot be read: {local}")
    attacked = attack(kind, global_state, local.to_torch_state_dict(), scale)
    out = RecordDict(dict(content.items()))
    out["arrays"] = encode_int8_update(global_state, attacked) if int8 else ArrayRecord(attacked)
    return out


def _attacked_fitres(request: RecordDict, content: RecordDict, kind: str, scale: float) -> RecordDict:
    """A SecAgg+ reply (a legacy FitRes, masked later by Flower's secaggplus_mod): it carries the
    update (local - global, clipped under DP-FedAvg), so the attack acts in update space (a zero
    global adapter); the attacked update is not clipped again."""
    keys = str(recorddict_compat.recorddict_to_fitins(request, keep_input=True).config[SECAGG_KEYS]).split("\n")
    fitres = recorddict_compat.recorddict_to_fitres(content, keep_input=True)
    update = {
        k: torch.from_numpy(a.copy()) for k, a in zip(keys, parameters_to_ndarrays(fitres.parameters), strict=True)
    }
    attacked = attack(kind, {k: torch.zeros_like(v) for k, v in update.items()}, update, scale)
    fitres.parameters = ndarrays_to_parameters([attacked[k].numpy().astype(np.float32) for k in keys])
    return recorddict_compat.fitres_to_recorddict(fitres, keep_input=True)
