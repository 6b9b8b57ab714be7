"""Flower ClientApp: decode the message, run the local round, encode the reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_dp_lora.config import ConfigError, load_config
from fed_dp_lora.data import DataError
from fed_dp_lora.local_round import train_round
from fed_dp_lora.privacy.accountant import BudgetExceeded
from fed_dp_lora.privacy.engine import CoverageError

LEDGER_KEY = "privacy-ledger"
# Error codes in replies, so the server can tell a refusal from a crash.
REFUSED_BUDGET, REFUSED_CONFIG = 100, 101

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of DP-SGD on this client's records; refusals become error replies."""
    try:
        cfg = load_config(context.run_config)
        ledger = context.state.config_records.get(LEDGER_KEY)
        result = train_round(
            cfg,
            context.node_config,
            msg.content["arrays"].to_torch_state_dict(),
            dict(ledger) if ledger is not None else None,
        )
    except BudgetExceeded as err:
        return Message(Error(code=REFUSED_BUDGET, reason=str(err)), reply_to=msg)
    except (ConfigError, DataError, CoverageError) as err:
        return Message(Error(code=REFUSED_CONFIG, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
    if result.ledger is not None:
        # The ledger lives in context.state: it outlives this process (deployment starts a
        # new one per message) and composes over every round this client trained.
        context.state[LEDGER_KEY] = ConfigRecord(result.ledger)
    content = RecordDict(
        {"arrays": ArrayRecord(result.state), "metrics": MetricRecord(result.metrics)}
    )
    return Message(content=content, reply_to=msg)
