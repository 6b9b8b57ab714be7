"""Flower ServerApp: compose the config, build the strategy, run it, write the outputs.

With secagg=true the rounds run on Flower's legacy SecAgg+ workflow (strategies/secagg.py),
with the same evaluation, adapter folders and summary.json.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fed_dp_lora.central import CentralEvaluator
from fed_dp_lora.config import load_config, to_plain
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.strategies.factory import user_level_dp
from fed_dp_lora.strategies.secagg import run_secagg

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
    central = CentralEvaluator(cfg)
    report.majority_baseline = central.majority
    if central.majority:
        log(INFO, "Majority-class baseline on the central test set: %s", central.majority)

    def evaluate_state(server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = central.evaluate(state)
        if server_round > 0:
            central.save_adapter(state, out / "adapters" / f"round-{server_round}")
            report.record_eval(server_round, metrics)
            report.write()
            log(INFO, report.progress_line(server_round, int(cfg.rounds)))
        return metrics

    if cfg.secagg:
        dp = user_level_dp(cfg, report) if cfg.strategy.name == "dp-fedavg" else None
        run_secagg(grid, context, cfg, report, central.initial_state(), evaluate_state, dp)
        log(INFO, "fed-dp-lora: summary written to %s", report.write())
        return

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluate_state(server_round, arrays.to_torch_state_dict()))

    strategy = build_strategy(cfg, report)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(central.initial_state()),
        num_rounds=int(cfg.rounds),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    log(INFO, "fed-dp-lora: summary written to %s", report.write())
