"""The server's side of one run: outputs, resume, checkpoints, central evaluation, audits, tracking.

`server_app.main` only wires Flower's grid and context to a ServerRun. The order that keeps a
resumed run honest lives here: a round's outcome is recorded, then the strategy's state (e.g.
DP-FedAvg's noise RNG and ledger) is checkpointed before any artefact of the round is written,
so a crash in between never replays a noise draw on a resume.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fed_dp_lora import checkpoint
from fed_dp_lora.advice import majority_warning
from fed_dp_lora.audit.canary import CanaryAudit
from fed_dp_lora.audit.release import ReleaseAudit
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.config import to_plain
from fed_dp_lora.report import RunReport
from fed_dp_lora.report_page import write_report
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.strategies.averaging import CheckedAggregation
from fed_dp_lora.strategies.factory import user_level_dp
from fed_dp_lora.strategies.outcome import RoundOutcome
from fed_dp_lora.strategies.rounds import run_rounds
from fed_dp_lora.strategies.secagg import run_secagg
from fed_dp_lora.tracking import make_tracker

State = dict[str, torch.Tensor]


def output_dir(configured: str | None) -> Path:
    """`output-dir` from the run config, else ./outputs/<timestamp> (absolute, logged)."""
    if configured:
        return Path(configured)
    return (Path.cwd() / "outputs" / time.strftime("%Y%m%d-%H%M%S")).resolve()


class ServerRun:
    """Everything the ServerApp keeps across rounds, and what it does after each one."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.out = output_dir(cfg.output_dir)
        cfg.output_dir = str(self.out)
        log(INFO, "fed-dp-lora: outputs go to %s", self.out)
        self.rounds, self.interval = int(cfg.rounds), int(cfg.eval.interval)
        self.report = RunReport(self.out, to_plain(cfg))
        self.resumed = checkpoint.resume_point(self.out, self.report.config, bool(cfg.resume))
        self.tracker = make_tracker(str(cfg.tracking.backend), self.out)
        self.tracker.log_config(self.report.config)
        self.central = CentralEvaluator(cfg)
        self.initial = self.central.initial_state()
        self.canary_audit = CanaryAudit(cfg, self.central, self.initial) if cfg.audit.enabled else None
        self.release_audit = ReleaseAudit(cfg, self.initial) if cfg.audit.release.enabled else None
        self.report.majority_baseline = self.central.majority
        if self.central.majority:
            log(INFO, "Majority-class baseline on the central test set: %s", self.central.majority)
        if self.central.length_info:
            log(
                WARNING if self.central.length_warning else INFO,
                self.central.length_warning or self.central.length_info,
            )
        self.final: State = dict(self.initial)  # the last global adapter: what the canary audit reads

    def execute(self, grid: Grid, context: Context) -> None:
        """All rounds: on Flower's SecAgg+ workflow (secagg=true) or on our round loop."""
        if self.cfg.secagg:
            self._run_secagg(grid, context)
        else:
            self._run_rounds(grid)

    def evaluate_state(self, server_round: int, state: State) -> dict[str, float] | None:
        """Evaluate (at the configured cadence) and save a round's global adapter; write the report.

        Round 0 (the initial adapter) is evaluated only when every round is.
        """
        every = self.interval
        evaluated = server_round == self.rounds or server_round % every == 0 and (server_round > 0 or every == 1)
        started = time.perf_counter()
        metrics = self.central.evaluate(state) if evaluated else None
        if server_round > 0:
            evaluated_at = time.perf_counter()
            self.final.update(state)
            self.central.save_adapter(state, self.out / "adapters" / f"round-{server_round}")
            self.report.record_timing(
                server_round, {"evaluate": evaluated_at - started, "save": time.perf_counter() - evaluated_at}
            )
            if metrics is not None:
                self.report.record_eval(server_round, metrics)
                self._warn_majority(server_round, metrics)
            self.report.write()
            self.tracker.log_round(self.report.rounds[-1])
            log(INFO, self.report.progress_line(server_round, self.rounds))
        return metrics

    def _warn_majority(self, server_round: int, metrics: dict[str, float]) -> None:
        """Tell the operator, with what to change, when the global model predicts one class only."""
        labels = self.central.num_labels
        warning = majority_warning(self.cfg, metrics, labels) if labels else None
        if warning:
            log(WARNING, "fed-dp-lora: round %d: %s", server_round, warning)

    def record(self, outcome: RoundOutcome) -> None:
        """What the aggregator returned for a round goes into the report (and the release audit's result)."""
        self.report.record_round(outcome)
        if self.release_audit is not None:
            self.report.release_audit = self.release_audit.result()

    def finish(self) -> None:
        """The audits of the final adapter, the summary and the report page."""
        if self.canary_audit is not None:
            audit = self.report.audit = self.canary_audit.result(self.final, *self.report.claim())
            log(
                INFO,
                "Privacy audit: epsilon lower bound %.3f at %.0f%% confidence (claimed: %s)",
                audit["epsilon_lower"],
                100 * audit["confidence"],
                audit["claimed_epsilon"],
            )
        if self.release_audit is not None:
            self.report.release_audit = self.release_audit.result()
            log(INFO if self.release_audit.rounds else WARNING, self.release_audit.progress_line())
        self.tracker.close()
        log(INFO, "fed-dp-lora: summary written to %s", self.report.write())
        log(INFO, "fed-dp-lora: report written to %s", write_report(self.report.summary(), self.out)[1])

    # -- the message-API strategies, on our round loop ---------------------------------------

    def _run_rounds(self, grid: Grid) -> None:
        strategy = build_strategy(self.cfg)
        if self.release_audit is not None:
            strategy.release_observer = self.release_audit.observe
        start = self._start(strategy)
        resumed = self.resumed
        if resumed is not None and resumed.report["run"]["stopped"]:
            log(
                INFO, "fed-dp-lora: the run had stopped early (%s); nothing to resume", resumed.report["run"]["stopped"]
            )
            return
        first = 1 if resumed is None else resumed.completed_round + 1

        def after_round(server_round: int, arrays: ArrayRecord, outcome: RoundOutcome) -> None:
            self.record(outcome)
            state = arrays.to_torch_state_dict()
            self._save_checkpoint(strategy, server_round, state)
            self.evaluate_state(server_round, state)
            self._save_checkpoint(strategy, server_round, state)  # again, now with the round's metrics

        run_rounds(
            strategy,
            grid,
            ArrayRecord(start),
            range(first, self.rounds + 1),
            ConfigRecord({"study-id": self.report.run["study"]}),
            float(self.cfg.strategy.round_timeout),
            after_round,
        )

    def _start(self, strategy: CheckedAggregation) -> State:
        """The adapter the first round starts from: the initial one, or a stopped run's last."""
        resumed = self.resumed
        if resumed is None:
            self.report.run["study"] = checkpoint.new_study()
            self.report.write()  # from the start, so the live dashboard shows the run before round 1 ends
            self.evaluate_state(0, self.initial)
            return dict(self.initial)
        self.report.load_state_dict(resumed.report)
        self.report.run["resumed_after_round"].append(resumed.completed_round)
        strategy.load_state_dict(resumed.strategy)
        resumed.restore_rng()
        if self.release_audit is not None and resumed.audit is not None:
            self.release_audit.load_state_dict(resumed.audit)
        log(
            INFO,
            "fed-dp-lora: resuming study %s after round %d of %d",
            self.report.run["study"],
            resumed.completed_round,
            self.rounds,
        )
        self.final.update(resumed.adapter)
        self.report.write()
        if not (self.out / "adapters" / f"round-{resumed.completed_round}").is_dir():
            # The stop came between the checkpoint and the round's outputs: write them now.
            self.evaluate_state(resumed.completed_round, dict(resumed.adapter))
        return dict(resumed.adapter)

    def _save_checkpoint(self, strategy: CheckedAggregation, server_round: int, adapter: State) -> None:
        release = self.release_audit
        checkpoint.save(
            self.out,
            checkpoint.Checkpoint(
                study=self.report.run["study"],
                completed_round=server_round,
                config=self.report.config,
                adapter=dict(adapter),
                strategy=strategy.state_dict(),
                report=self.report.state_dict(),
                python_rng=random.getstate(),
                audit=release.state_dict() if release is not None else None,
            ),
        )

    # -- SecAgg+, on Flower's legacy workflow -------------------------------------------------

    def _run_secagg(self, grid: Grid, context: Context) -> None:
        """config.validate refuses resume with secagg: a SecAgg+ run always starts at round 1."""
        self.report.run["study"] = checkpoint.new_study()
        self.report.write()
        dp = user_level_dp(self.cfg) if self.cfg.strategy.name == "dp-fedavg" else None
        run_secagg(
            grid, context, self.cfg, self.initial, self.evaluate_state, self.record, dp, self.report.run["study"]
        )
