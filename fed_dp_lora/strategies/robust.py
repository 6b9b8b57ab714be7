"""Byzantine-robust aggregation of LoRA adapters: Krum, Multi-Krum, trimmed mean, median.

Flower's Krum/MultiKrum/FedTrimmedAvg/FedMedian do the statistics; these subclasses put the
update checks of CheckedAggregation in front of them (every reply screened, malformed ones
rejected and logged with the node id) and return what the aggregator chose in the round's outcome.

What is aggregated robustly: the tensors that travel, i.e. the LoRA factors A and B (and the
head) of every client, each coordinate separately (trimmed mean, median) or as one
concatenated vector per client (Krum). The product update BA is never formed: it is a full
d x k matrix per layer (the size LoRA avoids), and a robust statistic of the products would
not factor back into rank-r A and B. Consequences, tested in tests/strategies/test_robust.py:
- Krum with one selected client returns that client's A and B, so the global BA is exactly
  one honest-looking client's BA.
- Coordinate-wise statistics of A and of B (vanilla LoRA) are robust estimates of A and B,
  not of BA: median(B) median(A) is in general not a median of the clients' B A.
- With lora=ffa, A is frozen and shared, only B travels, and the update s B A is linear in B:
  a robust statistic of B is the same statistic of the clients' updates in B-coordinates, so
  robust aggregation is meaningful there. Prefer lora=ffa with robust aggregators.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum

from fed_dp_lora.flower_internals import aggregate_arrayrecords, select_multikrum
from fed_dp_lora.strategies.averaging import CheckedAggregation
from fed_dp_lora.strategies.outcome import RoundOutcome


class AdapterMultiKrum(CheckedAggregation, MultiKrum):
    """Multi-Krum (Krum when num_selected=1) on screened adapter updates.

    Flower's MultiKrum.aggregate_train does not say whom it selected; this one calls the same
    selection (select_multikrum) and returns the selected clients in the round's outcome.
    num_selected=None selects n - f of the n accepted updates (Blanchard et al.'s m = n - f).
    """

    def __init__(self, num_malicious: int, num_selected: int | None, **kwargs) -> None:
        super().__init__(num_malicious_nodes=num_malicious, num_nodes_to_select=num_selected or 1, **kwargs)
        self.num_selected = num_selected

    def combine(
        self, server_round: int, accepted: list[Message], outcome: RoundOutcome
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not accepted:
            return None, None
        n, f = len(accepted), self.num_malicious_nodes
        if n < 2 * f + 3:
            log(
                WARNING,
                "Round %d: Krum tolerates f=%d malicious clients only with n >= 2f + 3 = %d updates; %d were accepted",
                server_round,
                f,
                2 * f + 3,
                n,
            )
        m = self.num_selected if self.num_selected is not None else max(1, n - f)
        contents = [r.content for r in accepted]
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=min(m, n))
        chosen_ids = {id(c) for c in chosen}
        outcome.strategy.update(
            {
                "selected": sorted(self.names.of_reply(r) for r in accepted if id(r.content) in chosen_ids),
                "num_malicious_assumed": f,
            }
        )
        arrays = aggregate_arrayrecords(chosen, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(chosen, self.weighted_by_key)


class AdapterTrimmedMean(CheckedAggregation, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of A, B and the head (Flower's FedTrimmedAvg), unweighted."""

    def combine(
        self, server_round: int, accepted: list[Message], outcome: RoundOutcome
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        cut = int(self.beta * len(accepted))
        if accepted and cut == 0:
            log(
                WARNING,
                "Round %d: trimmed mean with beta=%g trims nothing from %d updates",
                server_round,
                self.beta,
                len(accepted),
            )
        outcome.strategy["trimmed_per_tail"] = cut
        return FedTrimmedAvg.aggregate_train(self, server_round, accepted)


class AdapterMedian(CheckedAggregation, FedMedian):
    """Coordinate-wise median of A, B and the head (Flower's FedMedian), unweighted."""
