"""FedAvg over LoRA adapters, weighted by each client's record count.

Adds to Flower's FedAvg what a DP-LoRA run needs: every update is checked before
aggregation (a malformed one is rejected and logged, and the round goes on), refusals
(budget exhausted, bad data) are recorded with their reason, per-client privacy figures
and bytes on the wire are reported each round.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies.names import NodeNames
from fed_dp_lora.reply import Refusal
from fed_dp_lora.wire import INT8_UPDATE, UPLOAD_KEY, decode_int8_update, payload_bytes, update_problem


def _last_line(reason: str | None) -> str:
    """The message of an error reply, without a simulation backend's traceback."""
    lines = [ln.strip() for ln in (reason or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def _train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The largest client epsilon (a mean epsilon means nothing). Clients send no training loss:
    it is computed from their records without noise, so it stays in their local logs."""
    metrics = [r.metric_records["metrics"] for r in records]
    out: dict[str, float] = {"clients": float(len(metrics))}
    eps = [float(m["epsilon"]) for m in metrics if "epsilon" in m]
    if eps:
        out["epsilon-max"] = max(eps)
    return MetricRecord(out)


class CheckedAggregation:
    """Put in front of a Flower strategy (first base class): screen every reply, then aggregate.

    Errors and malformed updates (wrong keys or shapes, NaN/Inf, absurd norms) are recorded
    with the client's name and node id and left out; the accepted replies go to the Flower
    strategy's own aggregate_train, so every strategy keeps the same checks and reporting.
    """

    report: RunReport
    # Called with (round, metrics, adapter as received, global adapter sent) for every accepted
    # update, int8 uploads decoded: the release audit reads what the server sees here.
    release_observer: Callable[[int, MetricRecord, ArrayRecord, ArrayRecord], None] | None = None

    def __init__(self, report: RunReport, **kwargs) -> None:
        super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=_train_metrics, **kwargs)
        self.report = report
        self._sent: tuple[ArrayRecord, int] | None = None
        self._outgoing: list[Message] = []  # this round's messages, ids set once pushed
        self.stop_reason: str | None = None  # set when no further round can succeed
        self.names = NodeNames()

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this strategy exactly (see checkpoint.py)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (nothing for stateless aggregators)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.names.refresh(grid)
        self.report.run["nodes"] = self.names.table()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = (arrays, len(messages))
        self._outgoing = messages
        return messages

    def node_of(self, reply: Message) -> int:
        """The node a reply is about: for a SuperLink-made error (e.g. the node died) its
        sender is the SuperLink, so look up where the answered message went."""
        for sent in self._outgoing:
            if sent.metadata.message_id and sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def screen(self, server_round: int, replies: Iterable[Message], enforce_minimum: bool = True) -> list[Message]:
        """The replies that may be aggregated; records everything about the round's replies.

        With fewer accepted updates than `min_train_nodes` nothing is aggregated (the adapter
        is kept, the round is recorded as failed); when clients out of budget leave too few
        that could ever succeed, `stop_reason` ends the run cleanly.
        """
        reference, sent_to = self._sent if self._sent else (None, 0)
        accepted: list[Message] = []
        failures: dict[str, str] = {}
        clients: dict[str, dict[str, float]] = {}
        bytes_up = 0
        out_of_budget = 0
        # Replies arrive in completion order; aggregating in a fixed order makes the global adapter
        # (and so its digest, which seeds the clients' next streams) the same in a resumed run.
        for reply in sorted(replies, key=lambda r: self.names.of_reply(r, self.node_of(r))):
            name = self.names.of_reply(reply, self.node_of(reply))
            if reply.has_error():
                out_of_budget += int(reply.error.code == Refusal.BUDGET)
                reason = _last_line(reply.error.reason)
                failures[name] = f"error (code {reply.error.code}): {reason}"
                log(WARNING, "Round %d: %s did not train: %s", server_round, name, reason)
                continue
            arrays = reply.content.array_records.get("arrays")
            metrics = reply.content.metric_records.get("metrics")
            problem = "reply without arrays or metrics" if arrays is None or metrics is None else None
            sent_bytes = 0 if arrays is None else payload_bytes(arrays)
            upload = reply.content.config_records.get(UPLOAD_KEY)
            if problem is None and upload is not None and reference is not None:
                decoded = decode_int8_update(arrays, reference) if upload.get("encoding") == INT8_UPDATE \
                    else f"unknown upload encoding {upload.get('encoding')!r}"
                if isinstance(decoded, str):
                    problem = decoded
                else:  # from here on the reply carries the adapter, as every strategy expects
                    arrays = decoded
                    reply.content = RecordDict({"arrays": arrays, "metrics": metrics})
            if problem is None and reference is not None:
                problem = update_problem(arrays, reference)
            if problem is not None:
                failures[name] = f"rejected: {problem}"
                log(WARNING, "Round %d: rejected update from %s (node %d): %s",
                    server_round, name, reply.metadata.src_node_id, problem)
                continue
            bytes_up += sent_bytes
            clients[name] = {k: float(v) for k, v in metrics.items()}
            if self.release_observer is not None and reference is not None:
                self.release_observer(server_round, metrics, arrays, reference)
            accepted.append(reply)
        # Flower's aggregation refuses replies whose metrics differ in keys: keep the common ones
        # (the report above has every client's full metrics), so one odd reply cannot stop a round.
        common = set.intersection(*(set(r.content["metrics"].keys()) for r in accepted)) if accepted else set()
        for reply in accepted:
            metrics = reply.content["metrics"]
            if set(metrics.keys()) != common:
                reply.content = RecordDict({"arrays": reply.content["arrays"],
                                            "metrics": MetricRecord({k: metrics[k] for k in common})})
        bytes_down = payload_bytes(reference) * sent_to if reference is not None else 0
        minimum = int(self.min_train_nodes)
        if enforce_minimum and len(accepted) < minimum:
            failures["server"] = (f"only {len(accepted)} accepted update(s), fewer than "
                                  f"strategy.min_train_clients={minimum}: the adapter is kept")
            log(WARNING, "Round %d: %s", server_round, failures["server"])
            if sent_to - out_of_budget < minimum:
                self.stop_reason = (f"{out_of_budget} of {sent_to} clients are out of privacy budget, so "
                                    f"fewer than strategy.min_train_clients={minimum} can still train")
            accepted = []
        self.report.record_train(server_round, clients, failures, bytes_up, bytes_down)
        log(INFO, "Round %d: %d updates accepted, %d failed", server_round, len(accepted), len(failures))
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen(server_round, list(replies))
        if not accepted:
            return None, None
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]


class AdapterFedAvg(CheckedAggregation, FedAvg):
    """FedAvg on adapters with update checks and per-client reporting."""
