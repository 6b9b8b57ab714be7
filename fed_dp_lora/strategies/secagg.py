"""FedAvg and DP-FedAvg under Flower's SecAgg+: the server only ever sees the sum of updates.

SecAgg+ runs only on Flower's legacy server API (SecAggPlusWorkflow inside DefaultWorkflow,
with a legacy Strategy); this module hides that behind the same strategy choice and outputs
(RunReport rows, summary.json, adapter folders, progress lines) as the message-API strategies.

Clients send their update (adapter - global adapter), masked; the workflow unmasks the
weighted mean of the updates of the clients that finished stage 2 and hands it to
`aggregate_fit`. With fedavg the weights are num-examples / max_weight (what FedAvg does);
with dp-fedavg every client clips its update to C before masking (`wire.secagg_fitres`),
weights are equal, so mean * k is the sum of the clipped updates, and the server adds the
noise of `UserLevelDP` to that sum. Clients that drop out after key sharing are recovered
from their neighbours' shares as long as the reconstruction threshold is met.

What the server cannot do here: check individual updates (the per-update checks of the other
strategies need the individual update; only the unmasked aggregate is checked) or aggregate
robustly (config.py refuses that combination).
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from typing import Callable

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
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies.dp_fedavg import UserLevelDP
from fed_dp_lora.strategies.names import NodeNames
from fed_dp_lora.wire import SECAGG_CLIP, SECAGG_EQUAL, SECAGG_KEYS

EvaluateState = Callable[[int, dict[str, torch.Tensor]], dict[str, float] | None]
MAX_AGGREGATE_NORM = 1e6  # the same "absurd norm" bound wire.update_problem applies per update


def masked_upload_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of one client's masked vector as secaggplus_mod serializes it (the weight factor as
    a one-element array, then every tensor as int64 .npy); key exchange messages not counted."""
    arrays = [np.zeros(1, dtype=np.int64)] + [np.zeros(s, dtype=np.int64) for s in shapes]
    return sum(len(ndarray_to_bytes(a)) for a in arrays)


class SecAggAdapterStrategy(LegacyFedAvg):
    """Legacy strategy driven by SecAggPlusWorkflow: sampling, the update, reports, evaluation."""

    def __init__(
        self,
        report: RunReport,
        initial: dict[str, torch.Tensor],
        evaluate_state: EvaluateState,
        *,
        fraction: float,
        min_clients: int,
        min_available: int,
        dp: UserLevelDP | None = None,
        study: str = "",
        grid: Grid | None = None,
    ) -> None:
        super().__init__(fraction_fit=fraction, fraction_evaluate=0.0, min_fit_clients=min_clients,
                         min_evaluate_clients=0, min_available_clients=min_available)
        self.report = report
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
        client_manager.wait_for(self.min_available_clients)
        proxies = {p.node_id: p for p in client_manager.all().values()}
        if self.grid is not None:
            self.names.refresh(self.grid)
            self.report.run["nodes"] = self.names.table()
        self._global = dict(zip(self.keys, parameters_to_ndarrays(parameters)))
        config: dict[str, Scalar] = {SECAGG_KEYS: "\n".join(self.keys), "server-round": server_round,
                                      "study-id": self.study}
        if self.dp is not None:
            self.dp.plan(len(proxies))
            self._skip_reason = self.dp.budget_problem()
            if self._skip_reason is not None:
                log(WARNING, "Round %d: %s", server_round, self._skip_reason)
                self.report.record_train(server_round, {}, {"server": self._skip_reason}, 0, 0)
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
        clients: dict[str, dict[str, float]] = {}
        returned: set[int] = set()
        for proxy, fitres in results:
            metrics = {k: float(v) for k, v in fitres.metrics.items()}
            name = f"client-{int(metrics['partition-id'])}" if "partition-id" in metrics else self.names.of(proxy.node_id)
            clients[name] = metrics
            returned.add(proxy.node_id)
        missing = {self.names.of(n): "dropped out of secure aggregation (no masked update)"
                   for n in self._sampled if n not in returned}
        for name in missing:
            log(WARNING, "Round %d: %s %s", server_round, name, missing[name])
        size = masked_upload_bytes(self.shapes)
        down = sum(len(ndarray_to_bytes(self._global[k])) for k in self.keys) * len(self._sampled)
        self.report.record_train(server_round, clients, missing, size * len(results), down)
        if not results:
            return None, {}
        mean = dict(zip(self.keys, parameters_to_ndarrays(results[0][1].parameters)))
        if self.dp is not None:
            clipped_sum = {k: v.astype(np.float64) * len(results) for k, v in mean.items()}
            new = self.dp.release(server_round, self._global, clipped_sum, len(results), None, len(self._sampled))
        else:
            new = {k: (self._global[k].astype(np.float64) + mean[k]).astype(self._global[k].dtype) for k in self.keys}
        norm = float(np.sqrt(sum(np.sum((new[k].astype(np.float64) - self._global[k]) ** 2) for k in self.keys)))
        if not all(np.all(np.isfinite(v)) for v in new.values()) or norm > MAX_AGGREGATE_NORM:
            reason = f"aggregate rejected: non-finite values or norm {norm:.3g} > {MAX_AGGREGATE_NORM:g}"
            log(WARNING, "Round %d: %s; the global adapter is kept", server_round, reason)
            self.report.rounds[-1]["failures"]["server"] = reason
            return None, {}
        log(INFO, "Round %d: SecAgg+ aggregate of %d masked updates", server_round, len(results))
        eps = [m["epsilon"] for m in clients.values() if "epsilon" in m]
        metrics = {"clients": float(len(clients)), **({"epsilon-max": max(eps)} if eps else {})}
        return ndarrays_to_parameters([new[k] for k in self.keys]), metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round > 0 and not any(r["round"] == server_round for r in self.report.rounds):
            # The workflow halted before aggregate_fit (too few clients or shares left).
            self.report.record_train(server_round, {}, {"server": "secure aggregation halted: fewer than 2 "
                                     "clients sampled, or too few left for the reconstruction threshold"}, 0, 0)
        state = {k: torch.from_numpy(a.copy()) for k, a in zip(self.keys, parameters_to_ndarrays(parameters))}
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
    report: RunReport,
    initial: dict[str, torch.Tensor],
    evaluate_state: EvaluateState,
    dp: UserLevelDP | None,
    study: str,
) -> None:
    """Run all rounds through DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))."""
    s, sp = cfg.strategy, cfg.secaggplus
    strategy = SecAggAdapterStrategy(
        report, initial, evaluate_state, fraction=float(s.fraction_train), min_clients=int(s.min_train_clients),
        min_available=int(s.min_available_clients), dp=dp, study=study, grid=grid,
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
