"""Flower ServerApp: compose the config, build the strategy, run it, write the outputs.

With secagg=true the rounds run on Flower's legacy SecAgg+ workflow (strategies/secagg.py),
with the same evaluation, adapter folders and summary.json.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fed_dp_lora import checkpoint
from fed_dp_lora.advice import majority_warning
from fed_dp_lora.audit.release import ReleaseAudit
from fed_dp_lora.canary_audit import CanaryAudit
from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.report import RunReport
from fed_dp_lora.report_page import write_report
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.strategies.factory import user_level_dp
from fed_dp_lora.strategies.rounds import run_rounds
from fed_dp_lora.strategies.secagg import run_secagg
from fed_dp_lora.tracking import make_tracker

app = ServerApp()


def output_dir(configured: str | None) -> Path:
    """`output-dir` from the run config, else ./outputs/<timestamp> (absolute, logged)."""
    if configured:
        return Path(configured)
    return (Path.cwd() / "outputs" / time.strftime("%Y%m%d-%H%M%S")).resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(context.run_config)
    out = output_dir(cfg.output_dir)
    cfg.output_dir = str(out)
    log(INFO, "fed-dp-lora: outputs go to %s", out)
    report = RunReport(out, to_plain(cfg))
    resumed = checkpoint.resume_point(out, report.config, bool(cfg.resume))
    tracker = make_tracker(str(cfg.tracking.backend), out)
    tracker.log_config(report.config)
    central = CentralEvaluator(cfg)
    initial = central.initial_state()
    audit = CanaryAudit(cfg, central, initial) if cfg.audit.enabled else None
    release_audit = ReleaseAudit(cfg, initial) if cfg.audit.release.enabled else None
    report.majority_baseline = central.majority
    if central.majority:
        log(INFO, "Majority-class baseline on the central test set: %s", central.majority)
    if central.length_info:
        log(WARNING if central.length_warning else INFO, central.length_warning or central.length_info)

    rounds, interval = int(cfg.rounds), int(cfg.eval.interval)
    strategy = None if cfg.secagg else build_strategy(cfg, report)
    if strategy is not None and release_audit is not None:
        strategy.release_observer = release_audit.observe
    start_arrays = dict(initial)
    if resumed is None:
        report.run["study"] = checkpoint.new_study()
    else:
        report.load_state_dict(resumed.report)
        report.run["resumed_after_round"].append(resumed.completed_round)
        assert strategy is not None  # config.validate refuses resume with secagg
        strategy.load_state_dict(resumed.strategy)
        resumed.restore_rng()
        start_arrays = dict(resumed.adapter)
        if release_audit is not None and resumed.audit is not None:
            release_audit.load_state_dict(resumed.audit)
        log(INFO, "fed-dp-lora: resuming study %s after round %d of %d", report.run["study"],
            resumed.completed_round, rounds)
    final = dict(start_arrays)
    report.write()  # from the start, so the live dashboard shows the run before its first round ends

    def evaluate_state(server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        # Round 0 (the initial adapter) is evaluated only when every round is.
        evaluated = server_round == rounds or server_round % interval == 0 and (server_round > 0 or interval == 1)
        started = time.perf_counter()
        metrics = central.evaluate(state) if evaluated else None
        if server_round > 0:
            evaluated_at = time.perf_counter()
            final.update(state)
            central.save_adapter(state, out / "adapters" / f"round-{server_round}")
            report.record_timing(server_round, {"evaluate": evaluated_at - started,
                                                "save": time.perf_counter() - evaluated_at})
            if metrics is not None:
                report.record_eval(server_round, metrics)
                warning = majority_warning(cfg, metrics, central.num_labels) if central.num_labels else None
                if warning:
                    log(WARNING, "fed-dp-lora: round %d: %s", server_round, warning)
            report.write()
            tracker.log_round(report.rounds[-1])
            log(INFO, report.progress_line(server_round, rounds))
        return metrics

    if cfg.secagg:
        dp = user_level_dp(cfg, report) if cfg.strategy.name == "dp-fedavg" else None
        run_secagg(grid, context, cfg, report, initial, evaluate_state, dp, report.run["study"])
    else:
        assert strategy is not None

        def save_checkpoint(server_round: int, adapter: dict[str, torch.Tensor]) -> None:
            report.run["stopped"] = strategy.stop_reason
            checkpoint.save(out, checkpoint.Checkpoint(
                study=report.run["study"], completed_round=server_round, config=report.config,
                adapter=dict(adapter), strategy=strategy.state_dict(), report=report.state_dict(),
                python_rng=random.getstate(),
                audit=release_audit.state_dict() if release_audit is not None else None,
            ))

        def after_round(server_round: int, arrays: ArrayRecord) -> None:
            state = arrays.to_torch_state_dict()
            if release_audit is not None:
                report.release_audit = release_audit.result()
            # The strategy's state (DP-FedAvg's noise RNG and ledger) is on disk before any
            # artefact of the round: a crash in between never replays a noise draw on a resume.
            save_checkpoint(server_round, state)
            evaluate_state(server_round, state)
            save_checkpoint(server_round, state)  # again, now with the round's metrics

        first = 1 if resumed is None else resumed.completed_round + 1
        if resumed is None:
            evaluate_state(0, initial)
        elif not (out / "adapters" / f"round-{resumed.completed_round}").is_dir():
            # The stop came between the checkpoint and the round's outputs: write them now.
            evaluate_state(resumed.completed_round, dict(resumed.adapter))
        if resumed is not None and resumed.report["run"]["stopped"]:
            log(INFO, "fed-dp-lora: the run had stopped early (%s); nothing to resume", resumed.report["run"]["stopped"])
        else:
            run_rounds(strategy, grid, ArrayRecord(start_arrays), range(first, rounds + 1),
                       ConfigRecord({"study-id": report.run["study"]}), float(cfg.strategy.round_timeout),
                       after_round)
    if audit is not None:
        report.audit = audit.result(final, *report.claim())
        log(INFO, "Privacy audit: epsilon lower bound %.3f at %.0f%% confidence (claimed: %s)",
            report.audit["epsilon_lower"], 100 * report.audit["confidence"], report.audit["claimed_epsilon"])
    if release_audit is not None:
        report.release_audit = release_audit.result()
        log(INFO if release_audit.rounds else WARNING, release_audit.progress_line())
    tracker.close()
    log(INFO, "fed-dp-lora: summary written to %s", report.write())
    log(INFO, "fed-dp-lora: report written to %s", write_report(report.summary(), out)[1])
