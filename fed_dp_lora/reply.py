"""Everything a client may send the server, and why each item is safe to send.

The server is the adversary. A reply carries the adapter (the output of DP-SGD, accounted by the
ledger), the metrics listed here, or an error code with a fixed text. Each metric is either an
output of the accounted mechanism, a function of public or server-supplied inputs only, or
public metadata the institution declared. Anything else a round computes from records (its
loss, how many records it read, how long it took) goes to the institution's local log
(local_log.py), never into a reply. `metrics()` refuses any key not listed below, so a new
metric cannot leak by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

# The reply's metric keys: clients write them, the server reads them, only through these names.
NUM_EXAMPLES = "num-examples"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
STEPS_TOTAL = "steps-total"
REPLAYED = "replayed"
PARTITION_ID = "partition-id"

# metric key -> why sending it reveals nothing about any record beyond the DP release.
METRICS: dict[str, str] = {
    NUM_EXAMPLES: "the institution's declared record count (node-config `records`; in simulation the "
    "partition size of a public data set): public metadata, never the file's count. "
    "It is the FedAvg weight Flower's strategies read",
    EPSILON: "the study's epsilon from the ledger: a function of the noise multiplier, q, steps and "
    "delta, all public or server-supplied",
    DELTA: "min(run's delta or 1/(10 records), node `max-delta`): public",
    NOISE_MULTIPLIER: "calibrated from the budgets, q, steps and delta (public), or the run's own value",
    SAMPLE_RATE: "q = batch size / declared records: public",
    STEPS: "round(epochs / q): public",
    STEPS_TOTAL: "the study's steps so far: a function of the public plan and of the server's requests",
    REPLAYED: "1 when the kept release is sent again for a repeated request: depends only on what the server asked",
    PARTITION_ID: "simulation only: the public slot of a simulated client",
}


class Refusal(IntEnum):
    """Error codes of a refusing client; each has one fixed text (the detail stays local)."""

    BUDGET = 100
    CONFIG = 101
    LEDGER = 102
    POLICY = 103
    INPUT = 104
    DATA = 105
    APP = 106  # sent by the institution's launcher (deploy/), not the ClientApp: none of the bundle ran
    INTERNAL = 199


# Fixed texts: they never depend on data. CONFIG alone may carry the validation message of the
# run config, which is a function of the server's own input (see client_app.py).
REFUSAL_TEXT: dict[Refusal, str] = {
    Refusal.BUDGET: "privacy budget: this round would exceed the institution's budget; it did not train",
    Refusal.CONFIG: "configuration refused",
    Refusal.LEDGER: "the institution's privacy state cannot be used; it did not train (see its local log)",
    Refusal.POLICY: "the institution's policy refuses this request (see its local log)",
    Refusal.INPUT: "the global adapter or instructions sent are malformed or out of range; refused",
    Refusal.DATA: "the institution's data is unavailable for this task (see its local log)",
    Refusal.APP: "app bundle refused: not the code this institution installed, nor a hash it pinned",
    Refusal.INTERNAL: "the client failed; the detail is in the institution's local log",
}

# ConfigRecord of public, non-numeric metadata in a reply.
NODE_RECORD = "node"
NODE_FIELDS: dict[str, str] = {
    "name": "the institution's name as it declared it (node-config `name`): public metadata",
}


def metrics(values: Mapping[str, float]) -> dict[str, float]:
    """The reply's metrics; refuses any key that is not on the allowlist."""
    unknown = sorted(set(values) - set(METRICS))
    if unknown:
        raise KeyError(
            f"metric(s) {unknown} are not on the reply allowlist (fed_dp_lora/reply.py). "
            "Anything computed from records goes to the local log"
        )
    return {k: float(v) for k, v in values.items()}


def node_fields(values: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(values) - set(NODE_FIELDS))
    if unknown:
        raise KeyError(f"node field(s) {unknown} are not on the reply allowlist (fed_dp_lora/reply.py)")
    return {k: str(v) for k, v in values.items()}


def markdown() -> str:
    """The allowlist as the table docs/privacy.md shows (generated, so it cannot drift)."""
    rows = [
        "| reply field | why the server may see it |",
        "|---|---|",
        "| `arrays` | the adapter after DP-SGD: the accounted mechanism (or its int8 post-processing) |",
    ]
    rows += [f"| metric `{k}` | {why} |" for k, why in METRICS.items()]
    rows += [f"| `{NODE_RECORD}.{k}` | {why} |" for k, why in NODE_FIELDS.items()]
    rows += ["", "| error code | fixed text |", "|---|---|"]
    rows += [f"| {int(code)} ({code.name.lower()}) | {text} |" for code, text in REFUSAL_TEXT.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
