"""Driving the real ClientApp the way the runtime does: a Context per node, one message per round."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from omegaconf import DictConfig

from fed_dp_lora.client_app import LEDGER_KEY
from fed_dp_lora.client_data import model_spec
from fed_dp_lora.config import compose_config, load_config
from fed_dp_lora.data.columns import column_names, declared
from fed_dp_lora.data.sources import CREDIT_LABELS, credit_table
from fed_dp_lora.models import ModelSpec, build, trainable_state
from fed_dp_lora.reply import METRICS, NODE_FIELDS, NODE_RECORD

FAST = "+preset=tiny train.batch_size=16 train.epochs=0.001"
FIXED_NOISE = f"{FAST} privacy.noise_multiplier=1.0 rounds=3"
SIM_NODE = {"partition-id": 0, "num-partitions": 3}
STUDY = "study-1"


def run_config(overrides: str) -> dict:
    return {"overrides": overrides, "output-dir": ""}


def make_context(overrides: str, node_config: dict | None = None, node_id: int = 11) -> Context:
    return Context(run_id=7, node_id=node_id, node_config=dict(SIM_NODE if node_config is None else node_config),
                   state=RecordDict(), run_config=run_config(overrides))


@functools.lru_cache(maxsize=8)
def _built_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return trainable_state(build(spec))


def initial_adapter(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The trainable tensors of a freshly built model for cfg: a valid global adapter that no
    earlier test trained (the process-wide cached model is the clients' working copy, shared
    by every configuration that builds the same model)."""
    return {name: tensor.clone() for name, tensor in _built_state(model_spec(cfg)).items()}


def global_adapter(overrides: str) -> dict[str, torch.Tensor]:
    """A valid global adapter for this config (see initial_adapter)."""
    return initial_adapter(load_config(run_config(overrides)))


def train_message(state: dict[str, torch.Tensor], server_round: int, node_id: int = 11,
                  study: str | None = None) -> Message:
    config = {"server-round": server_round, **({"study-id": study} if study else {})}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def ok_metrics(reply: Message) -> dict[str, float]:
    """The metrics of a successful reply, after checking it carries only allowlisted records."""
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.metric_records) == {"metrics"}
    assert set(reply.content.config_records) <= {NODE_RECORD, "upload"}
    if NODE_RECORD in reply.content.config_records:
        assert set(reply.content[NODE_RECORD]) <= set(NODE_FIELDS)
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) <= set(METRICS), set(metrics) - set(METRICS)
    return metrics


def arrays_of(reply: Message) -> dict[str, torch.Tensor]:
    return reply.content["arrays"].to_torch_state_dict()


def ledger_of(context: Context) -> dict | None:
    record = context.state.config_records.get(LEDGER_KEY)
    return None if record is None else dict(record)


# What the default run's head reads besides the text (conf/data/credit.yaml); the institutions allow it.
CREDIT_COLUMNS = ",".join(column_names(declared(compose_config([]))))


def bank_file(path: Path, n: int, seed: int = 5, extra: pd.DataFrame | None = None) -> Path:
    """A CSV of n real credit applicants (text, label names and the table columns credit's
    data.columns reads), plus `extra` rows."""
    table = credit_table("classification").sample(n=n, random_state=seed)
    frame = table.assign(label=[CREDIT_LABELS[i] for i in table["label"]])
    if extra is not None:
        frame = pd.concat([frame, extra], ignore_index=True)
    frame.to_csv(path, index=False)
    return path


def institution_config(csv: Path, state_dir: Path, **extra) -> dict:
    """A deployment node-config with everything an institution with DP must declare."""
    return {"data-path": str(csv), "state-dir": str(state_dir), "records": 100, "epsilon": 50.0,
            "labels": "good,bad", "feature-columns": CREDIT_COLUMNS, **extra}
