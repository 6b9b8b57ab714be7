"""Flower ServerApp: compose the config, then hand Flower's grid to the server's run (server_run.py).

With secagg=true the rounds run on Flower's legacy SecAgg+ workflow (strategies/secagg.py),
with the same evaluation, adapter folders and summary.json.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_dp_lora.config import load_config
from fed_dp_lora.server_run import ServerRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = ServerRun(load_config(context.run_config))
    run.execute(grid, context)
    run.finish()
