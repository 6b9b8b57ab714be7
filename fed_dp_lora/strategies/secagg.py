"""FedAvg and DP-FedAvg under Flower's SecAgg+: the server only ever sees the sum of updates.

SecAgg+ runs only on Flower's legacy server API (SecAggPlusWorkflow inside DefaultWorkflow,
with a legacy Strategy); this module hides that behind the same strategy choice and outputs
(RunReport rows, summary.json, adapter folders, progress lines) as the message-API strategies.
Flower's workflow, not our round loop, calls this strategy, so it hands each round's
RoundOutcome to a `record` callback (the server's run records it in the report).

Clients send their update (adapter - global adapter), masked; the workflow unmasks the
weighted mean of the updates of the clients that finished stage 2 and hands it to
`aggregate_fit`. With fedavg the weights are num-examples / max_weight (what FedAvg does);
with dp-fedavg every client clips its update to C before masking (`wire.secagg_fitres`),
weights are equal, so mean * k is the sum of the clipped updates, and the server adds the
noise of `UserLevelDP` to that sum. Clients that drop out after key sharing are recovered
from their neighbours' shares as long as the reconstruction threshold is met.

What the server cannot do here: check individual updates (the per-update checks of the other
strategies need the individual update; only the unmasked aggregate is checked) or aggregate
robustly (config/rules.py refuses that combination).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fed_dp_lora.flower_internals import ClientProxy
from fed_dp_lora.reply import EPSILON, PARTITION_ID
from fed_dp_lora.strategies.dp_fedavg import UserLevelDP
from fed_dp_lora.strategies.names import NodeNames
from fed_dp_lora.strategies.outcome import RoundOutcome
from fed_dp_lora.wire import SECAGG_CLIP, SECAGG_EQUAL, SECAGG_KEYS

EvaluateState = Callable[[int, dict[str, torch.Tensor]], dict[str, float] | None]
RecordOutcome = Callable[[RoundOutcome], None]
MAX_AGGREGATE_NORM = 1e6  # the same "absurd norm" bound wire.update_problem applies per update


def _aggregate_problem(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> str | None:
    """Why the unmasked aggregate must not become the global adapter (only it can be checked)."""
    norm = float(np.sqrt(sum(np.sum((new[k].astype(np.float64) - old[k]) ** 2) for k in new)))
    if not all(np.all(np.isfinite(v)) for v in new.values()) or norm > MAX_AGGREGATE_NORM:
        return f"aggregate rejected: non-finite values or norm {norm:.3g} > {MAX_AGGREGATE_NORM:g}"
    return None


def masked_upload_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of one client's masked vector as secaggplus_mod serializes it (the weight factor as
    a one-element array, then every tensor as int64 .npy); key exchange messages not counted."""
    arrays = [np.zeros(1, dtype=np.int64)] + [np.zeros(s, dtype=np.int64) for s in shapes]
    return sum(len(ndarray_to_bytes(a)) for a in arrays)


class SecAggAdapterStrategy(LegacyFedAvg):
    """Legacy strategy driven by SecAggPlusWorkflow: sampling, the update, reports, evaluation."""

    def __init__(
        self,
        initial: dict[str, torch.Tensor],
        evaluate_state: EvaluateState,
        record: RecordOutcome,
        *,
        fraction: float,
        min_clients: int,
        min_available: int,
        dp: UserLevelDP | None = None,
        study: str = "",
        grid: Grid | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction,
            fraction_evaluate=0.0,
            min_fit_clients=min_clients,
            min_evaluate_clients=0,
            min_available_clients=min_available,
        )
        self.record = record
        self._recorded_round = 0  # the last round whose outcome went to `record`
        self.keys = list(initial)
        self.shapes = [tuple(initial[k].shape) for k in self.keys]
        self.initial = initial
        self.evaluate_state = evaluate_state
        self.dp = dp
        self.study = study
        self._global: dict[str, np.ndarray] = {}
        self._sampled: dict[int, ClientProxy] = {}
        self._skip_reason: str | None = None
        self.grid = grid  # for the institutions' registered names
        self.names = NodeNames()

    def __repr__(self) -> str:
        return f"SecAggAdapterStrategy({'dp-fedavg' if self.dp else 'fedavg'})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters([self.initial[k].numpy() for k in self.keys])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        client_manager.wait_for(self.min_available_clients, timeout=86400)  # Flower's default wait
        proxies = {p.node_id: p for p in client_manager.all().values()}
        if self.grid is not None:
            self.names.refresh(self.grid)
        self._global = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        config: dict[str, Scalar] = {
            SECAGG_KEYS: "\n".join(self.keys),
            "server-round": server_round,
            "study-id": self.study,
        }
        if self.dp is not None:
            self.dp.plan(len(proxies))
            self._skip_reason = self.dp.budget_problem()
            if self._skip_reason is not None:
                log(WARNING, "Round %d: %s", server_round, self._skip_reason)
                self._record(RoundOutcome(server_round, failures={"server": self._skip_reason}))
                return []
            chosen = self.dp.sample(list(proxies))
            config[SECAGG_CLIP] = float(self.dp.clip_norm)
            config[SECAGG_EQUAL] = True
        else:
            size, _ = self.num_fit_clients(len(proxies))
            chosen = random.sample(list(proxies), min(size, len(proxies)))
        self._sampled = {n: proxies[n] for n in chosen}
        fit_ins = FitIns(parameters, config)
        return [(proxies[n], fit_ins) for n in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        outcome = self._round_outcome(server_round, results)
        new = self._aggregate(server_round, results, outcome) if results else None
        problem = None if new is None else _aggregate_problem(new, self._global)
        if problem is not None:  # the release is accounted all the same: its noise was drawn
            log(WARNING, "Round %d: %s; the global adapter is kept", server_round, problem)
            outcome.failures["server"] = problem
            new = None
        self._record(outcome)
        if new is None:
            return None, {}
        log(INFO, "Round %d: SecAgg+ aggregate of %d masked updates", server_round, len(results))
        eps = [m[EPSILON] for m in outcome.clients.values() if EPSILON in m]
        aggregated: dict[str, Scalar] = {
            "clients": float(len(outcome.clients)),
            **({"epsilon-max": max(eps)} if eps else {}),
        }
        return ndarrays_to_parameters([new[k] for k in self.keys]), aggregated

    def _round_outcome(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> RoundOutcome:
        """Who sent a masked update (with its public metrics), who dropped out, bytes."""
        outcome = RoundOutcome(server_round, nodes=self.names.table() if self.grid is not None else None)
        for proxy, fitres in results:
            metrics = {k: float(v) for k, v in fitres.metrics.items()}
            simulated = PARTITION_ID in metrics
            name = f"client-{int(metrics[PARTITION_ID])}" if simulated else self.names.of(proxy.node_id)
            outcome.clients[name] = metrics
        returned = {proxy.node_id for proxy, _ in results}
        for node in self._sampled:
            if node not in returned:
                name = self.names.of(node)
                outcome.failures[name] = "dropped out of secure aggregation (no masked update)"
                log(WARNING, "Round %d: %s %s", server_round, name, outcome.failures[name])
        outcome.bytes_up = masked_upload_bytes(self.shapes) * len(results)
        outcome.bytes_down = sum(len(ndarray_to_bytes(self._global[k])) for k in self.keys) * len(self._sampled)
        return outcome

    def _aggregate(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], outcome: RoundOutcome
    ) -> dict[str, np.ndarray]:
        """The new global adapter from the unmasked mean of the updates (plus noise under DP, whose
        facts and user-level guarantee go into `outcome`)."""
        mean = dict(zip(self.keys, parameters_to_ndarrays(results[0][1].parameters), strict=True))
        if self.dp is None:
            return {k: (self._global[k].astype(np.float64) + mean[k]).astype(self._global[k].dtype) for k in self.keys}
        clipped_sum = {k: v.astype(np.float64) * len(results) for k, v in mean.items()}
        new, outcome.strategy = self.dp.release(
            server_round, self._global, clipped_sum, len(results), None, len(self._sampled)
        )
        outcome.user_level = self.dp.summary()
        return new

    def _record(self, outcome: RoundOutcome) -> None:
        self._recorded_round = outcome.server_round
        self.record(outcome)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round > 0 and self._recorded_round != server_round:
            # The workflow halted before aggregate_fit (too few clients or shares left).
            self._record(
                RoundOutcome(
                    server_round,
                    failures={
                        "server": "secure aggregation halted: fewer than 2 "
                        "clients sampled, or too few left for the reconstruction threshold"
                    },
                )
            )
        arrays = parameters_to_ndarrays(parameters)
        state = {k: torch.from_numpy(a.copy()) for k, a in zip(self.keys, arrays, strict=True)}
        metrics = self.evaluate_state(server_round, state)
        return None if metrics is None else (float(metrics.get("loss", 0.0)), dict(metrics))

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}


def run_secagg(
    grid: Grid,
    context: Context,
    cfg: DictConfig,
    initial: dict[str, torch.Tensor],
    evaluate_state: EvaluateState,
    record: RecordOutcome,
    dp: UserLevelDP | None,
    study: str,
) -> None:
    """Run all rounds through DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))."""
    s, sp = cfg.strategy, cfg.secaggplus
    strategy = SecAggAdapterStrategy(
        initial,
        evaluate_state,
        record,
        fraction=float(s.fraction_train),
        min_clients=int(s.min_train_clients),
        min_available=int(s.min_available_clients),
        dp=dp,
        study=study,
        grid=grid,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=sp.num_shares,
            reconstruction_threshold=sp.reconstruction_threshold,
            clipping_range=float(sp.clipping_range),
            # Equal weights (dp-fedavg) are 1: a smaller weight would scale the update down
            # before quantization and lose precision.
            max_weight=1.0 if dp is not None else float(sp.max_weight),
            timeout=None if sp.timeout is None else float(sp.timeout),
        )
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=int(cfg.rounds)), strategy=strategy)
    workflow(grid, legacy)
