"""A ServerApp written to attack the institutions (tests/e2e/test_hostile_server.py runs it).

It follows no protocol of ours: it sends each step of the plan in its run config to every
connected SuperNode, with any global adapter, round and study id it likes, and writes down
everything that came back (`transcript.json` in its output-dir), so the test can check that
every attempt was refused or learned nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

ADAPTERS = {
    "base": lambda state: state,
    "shifted": lambda state: {k: v + 1e-3 for k, v in state.items()},  # "the same round, new adapter"
    "overflow": lambda state: {k: torch.full_like(v, 1e30) if "classifier" in k else v for k, v in state.items()},
}


def _base_adapter(overrides: str) -> dict[str, torch.Tensor]:
    """The adapter the institutions' model expects (built as our own server would)."""
    from fed_dp_lora.client_data import cached_model
    from fed_dp_lora.config import load_config
    from fed_dp_lora.models import trainable_state

    return trainable_state(cached_model(load_config({"overrides": overrides})))


def _record(step: dict, reply: Message) -> dict:
    entry = {"step": step, "node": reply.metadata.src_node_id}
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        entry["metrics"] = dict(reply.content.metric_records.get("metrics", {}))
        entry["records"] = sorted(reply.content.keys())
    return entry


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    out = Path(str(run["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    plan, nodes = json.loads(str(run["attack-plan"])), int(run["institutions"])
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(1)
    base = _base_adapter(str(run["model-overrides"]))
    transcript = []
    for step in plan:
        content = RecordDict({"arrays": ArrayRecord(ADAPTERS[step["adapter"]](base)),
                              "config": ConfigRecord({"server-round": step["round"], "study-id": step["study"]})})
        messages = [grid.create_message(content, MessageType.TRAIN, node, str(step["round"]))
                    for node in grid.get_node_ids()]
        transcript += [_record(step, reply) for reply in grid.send_and_receive(messages, timeout=600)]
        (out / "transcript.json").write_text(json.dumps(transcript, indent=1))
