"""FedAvg over LoRA adapters, weighted by each client's record count.

Adds to Flower's FedAvg what a DP-LoRA run needs: every update is checked before
aggregation (a malformed one is rejected and logged, and the round goes on), refusals
(budget exhausted, bad data) are returned with their reason, with per-client privacy figures
and bytes on the wire, in each round's RoundOutcome (the server's run records it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_dp_lora.flower_internals import sample_nodes
from fed_dp_lora.reply import EPSILON, Refusal
from fed_dp_lora.strategies.names import NodeNames
from fed_dp_lora.strategies.outcome import RoundOutcome
from fed_dp_lora.wire import INT8_UPDATE, UPLOAD_KEY, decode_int8_update, payload_bytes, scalar, update_problem


def _last_line(reason: str | None) -> str:
    """The message of an error reply, without a simulation backend's traceback."""
    lines = [ln.strip() for ln in (reason or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def _train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The largest client epsilon (a mean epsilon means nothing). Clients send no training loss:
    it is computed from their records without noise, so it stays in their local logs."""
    metrics = [r.metric_records["metrics"] for r in records]
    out: dict[str, Any] = {"clients": float(len(metrics))}
    eps = [scalar(m[EPSILON]) for m in metrics if EPSILON in m]
    if eps:
        out["epsilon-max"] = max(eps)
    return MetricRecord(out)


class CheckedAggregation(FedAvg):
    """Put in front of a Flower strategy (first base class): screen every reply, then aggregate.

    Errors and malformed updates (wrong keys or shapes, NaN/Inf, absurd norms) are returned as
    failures with the client's name and node id and left out; the accepted replies go to the
    Flower strategy's own aggregate_train, so every strategy keeps the same checks and outcome.
    """

    # Called with (round, metrics, adapter as received, global adapter sent) for every accepted
    # update, int8 uploads decoded: the release audit reads what the server sees here.
    release_observer: Callable[[int, MetricRecord, ArrayRecord, ArrayRecord], None] | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=_train_metrics, **kwargs)
        self._sent: tuple[ArrayRecord, int] | None = None
        self._outgoing: list[Message] = []  # this round's messages, ids set once pushed
        self.stop_reason: str | None = None  # set when no further round can succeed
        self.names = NodeNames()

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this strategy exactly (see checkpoint.py)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (nothing for stateless aggregators)."""

    def online_nodes(self, grid: Grid) -> list[int]:
        """The nodes online once min_available_nodes are, each named from the registry.

        Flower's FedAvg sizes its sample from the nodes online before it waits for
        min_available_nodes, so a node that (re)connects during that wait would be left out even
        at fraction_train=1, and named by its id: wait first (Flower's own wait), then name."""
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)
        self.names.refresh(grid)
        return nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.online_nodes(grid)
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

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Screen the replies, aggregate the accepted ones, and say what happened."""
        accepted, outcome = self.screen(server_round, list(replies))
        outcome.arrays, outcome.metrics = self.combine(server_round, accepted, outcome)
        outcome.stop_reason = self.stop_reason
        return outcome

    def combine(
        self, server_round: int, accepted: list[Message], outcome: RoundOutcome
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's aggregate of the screened replies; subclasses add what they
        decided to `outcome.strategy`."""
        if not accepted:
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Strategy API (its own `start` loop); our round loop calls aggregate_round."""
        outcome = self.aggregate_round(server_round, replies)
        return outcome.arrays, outcome.metrics

    def screen(
        self, server_round: int, replies: Iterable[Message], enforce_minimum: bool = True
    ) -> tuple[list[Message], RoundOutcome]:
        """The replies that may be aggregated, and the round's outcome so far (who counted, who
        did not and why, bytes). Replies arrive in completion order; they are screened and
        aggregated in a fixed order (by name), so the global adapter, whose digest seeds the
        clients' next noise streams, is the same in a resumed run.
        """
        reference, sent_to = self._sent if self._sent else (None, 0)
        outcome = RoundOutcome(server_round, nodes=self.names.table())
        accepted: list[Message] = []
        out_of_budget = 0
        for reply in sorted(replies, key=lambda r: self.names.of_reply(r, self.node_of(r))):
            name = self.names.of_reply(reply, self.node_of(reply))
            if reply.has_error():
                out_of_budget += int(reply.error.code == Refusal.BUDGET)
                outcome.failures[name] = _error_failure(server_round, name, reply)
                continue
            problem, sent_bytes = _read_update(reply, reference)
            if problem is not None:
                outcome.failures[name] = f"rejected: {problem}"
                log(
                    WARNING,
                    "Round %d: rejected update from %s (node %d): %s",
                    server_round,
                    name,
                    reply.metadata.src_node_id,
                    problem,
                )
                continue
            metrics = reply.content.metric_records["metrics"]
            outcome.bytes_up += sent_bytes
            outcome.clients[name] = {k: scalar(v) for k, v in metrics.items()}
            if self.release_observer is not None and reference is not None:
                self.release_observer(server_round, metrics, reply.content.array_records["arrays"], reference)
            accepted.append(reply)
        _keep_common_metrics(accepted)
        outcome.bytes_down = payload_bytes(reference) * sent_to if reference is not None else 0
        if enforce_minimum:
            accepted = self._enforce_minimum(accepted, sent_to, out_of_budget, outcome)
        log(INFO, "Round %d: %d updates accepted, %d failed", server_round, len(accepted), len(outcome.failures))
        return accepted, outcome

    def _enforce_minimum(
        self, accepted: list[Message], sent_to: int, out_of_budget: int, outcome: RoundOutcome
    ) -> list[Message]:
        """With fewer accepted updates than `min_train_nodes` nothing is aggregated (the adapter
        is kept, the round is a failure); when clients out of budget leave too few that could
        ever succeed, `stop_reason` ends the run cleanly."""
        minimum = int(self.min_train_nodes)
        if len(accepted) >= minimum:
            return accepted
        outcome.failures["server"] = (
            f"only {len(accepted)} accepted update(s), fewer than "
            f"strategy.min_train_clients={minimum}: the adapter is kept"
        )
        log(WARNING, "Round %d: %s", outcome.server_round, outcome.failures["server"])
        if sent_to - out_of_budget < minimum:
            self.stop_reason = (
                f"{out_of_budget} of {sent_to} clients are out of privacy budget, so "
                f"fewer than strategy.min_train_clients={minimum} can still train"
            )
        return []


def _error_failure(server_round: int, name: str, reply: Message) -> str:
    """An error reply as a failure: its code and its message (without a backend's traceback)."""
    reason = _last_line(reply.error.reason)
    log(WARNING, "Round %d: %s did not train: %s", server_round, name, reason)
    return f"error (code {reply.error.code}): {reason}"


def _read_update(reply: Message, reference: ArrayRecord | None) -> tuple[str | None, int]:
    """(why the update cannot be aggregated or None, bytes it took on the wire).

    An int8 upload is decoded against the global adapter sent: from then on the reply carries
    the adapter, as every strategy expects. Then the adapter must match the global one in keys
    and shapes and be finite and of sane norm (wire.update_problem).
    """
    arrays = reply.content.array_records.get("arrays")
    metrics = reply.content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        return "reply without arrays or metrics", 0 if arrays is None else payload_bytes(arrays)
    sent_bytes = payload_bytes(arrays)
    if reference is None:
        return None, sent_bytes
    upload = reply.content.config_records.get(UPLOAD_KEY)
    if upload is not None:
        if upload.get("encoding") != INT8_UPDATE:
            return f"unknown upload encoding {upload.get('encoding')!r}", sent_bytes
        decoded = decode_int8_update(arrays, reference)
        if isinstance(decoded, str):
            return decoded, sent_bytes
        arrays = decoded
        reply.content = RecordDict({"arrays": arrays, "metrics": metrics})
    return update_problem(arrays, reference), sent_bytes


def _keep_common_metrics(accepted: list[Message]) -> None:
    """Flower's aggregation refuses replies whose metrics differ in keys: keep the common ones
    (the outcome has every client's full metrics), so one odd reply cannot stop a round."""
    kept = [r.content.metric_records["metrics"] for r in accepted]
    common = set.intersection(*(set(m.keys()) for m in kept)) if kept else set()
    for reply, all_metrics in zip(accepted, kept, strict=True):
        if set(all_metrics.keys()) != common:
            reply.content = RecordDict(
                {
                    "arrays": reply.content.array_records["arrays"],
                    "metrics": MetricRecord({k: all_metrics[k] for k in common}),
                }
            )


class AdapterFedAvg(CheckedAggregation, FedAvg):
    """FedAvg on adapters with update checks and per-client outcomes."""
