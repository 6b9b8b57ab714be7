"""Flower ClientApp: decode the message, run the local round, encode the reply."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fed_dp_lora.attacks import is_malicious
from fed_dp_lora.config import ConfigError, load_config
from fed_dp_lora.data import DataError
from fed_dp_lora.local_round import train_round
from fed_dp_lora.privacy.accountant import BudgetExceeded
from fed_dp_lora.privacy.engine import CoverageError
from fed_dp_lora.privacy.ledger_store import LedgerError
from fed_dp_lora.wire import (INT8_UPDATE, REFUSED_BUDGET, REFUSED_CONFIG, REFUSED_LEDGER, UPLOAD_KEY,
                              encode_int8_update, is_legacy_fitins, secagg_fitins, secagg_fitres)

LEDGER_KEY = "privacy-ledger"

app = ClientApp()


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod for SecAgg+ stage messages; plain train messages pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One round of DP-SGD on this client's records; refusals become error replies."""
    try:
        cfg = load_config(context.run_config)
        if cfg.secagg != is_legacy_fitins(msg.content):
            # Never answer a plain request with an individual update when SecAgg+ was agreed.
            raise ConfigError(f"secagg: the run says secagg={cfg.secagg} but the server sent "
                              f"{'SecAgg+' if not cfg.secagg else 'plain'} instructions. Fix: restart "
                              "the run with one secagg setting for server and clients")
        if cfg.secagg:
            global_state, config = secagg_fitins(msg.content)
        else:
            global_state = msg.content["arrays"].to_torch_state_dict()
            config = dict(msg.content.config_records.get("config", {}))
        ledger = context.state.config_records.get(LEDGER_KEY)
        result = train_round(cfg, context.node_config, global_state, dict(ledger) if ledger is not None else None,
                             int(config.get("server-round", 0)), config.get("study-id"))
    except BudgetExceeded as err:
        return Message(Error(code=REFUSED_BUDGET, reason=str(err)), reply_to=msg)
    except LedgerError as err:
        return Message(Error(code=REFUSED_LEDGER, reason=f"LedgerError: {err}"), reply_to=msg)
    except (ConfigError, DataError, CoverageError) as err:
        return Message(Error(code=REFUSED_CONFIG, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
    if result.ledger is not None:
        # The ledger lives in context.state: it outlives this process (deployment starts a
        # new one per message) and composes over every round this client trained.
        context.state[LEDGER_KEY] = ConfigRecord(result.ledger)
    if cfg.secagg:
        # A simulated attacker does not clip: the guarantee rests on honest clients' clipping.
        content = secagg_fitres(global_state, result.state, config, int(result.metrics["num-examples"]),
                                result.metrics, clip=not is_malicious(cfg, context.node_config))
        return Message(content=content, reply_to=msg)
    started = time.perf_counter()
    int8 = cfg.upload.compression == "int8"
    arrays = encode_int8_update(global_state, result.state) if int8 else ArrayRecord(result.state)
    metrics = MetricRecord({**result.metrics, "serialize-seconds": time.perf_counter() - started})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if int8:
        content[UPLOAD_KEY] = ConfigRecord({"encoding": INT8_UPDATE})
    return Message(content=content, reply_to=msg)
