"""Flower ClientApp: decode the message, run the client round, encode the reply.

Every reply is built from a `Released` (its cost already on the institution's disk) through
the allowlist in reply.py, or is an error with a code and a fixed text. Any exception, expected
or not, becomes such an error: Flower would otherwise send its message (which may quote data)
to the server. The detail goes to the institution's local log.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fed_dp_lora import local_log
from fed_dp_lora.client_round import InputRefused, Released, RoundRequest, train_round
from fed_dp_lora.config import ConfigError, load_config
from fed_dp_lora.data import DataError
from fed_dp_lora.flower_internals import RECORD_KEY_CONFIGS, ClientAppCallable
from fed_dp_lora.node_policy import PolicyError, is_simulated
from fed_dp_lora.privacy.accountant import BudgetExceeded
from fed_dp_lora.privacy.institution_ledger import InstitutionLedger
from fed_dp_lora.privacy.ledger_store import LedgerError
from fed_dp_lora.reply import NODE_RECORD, NUM_EXAMPLES, REFUSAL_TEXT, Refusal, node_fields
from fed_dp_lora.wire import (
    INT8_UPDATE,
    UPLOAD_KEY,
    encode_int8_update,
    is_legacy_fitins,
    secagg_fitins,
    secagg_fitres,
    secagg_quantization_margin,
)

LEDGER_KEY = "privacy-ledger"
REFUSALS: tuple[tuple[type[BaseException], Refusal], ...] = (
    (BudgetExceeded, Refusal.BUDGET),
    (LedgerError, Refusal.LEDGER),
    (PolicyError, Refusal.POLICY),
    (InputRefused, Refusal.INPUT),
    (DataError, Refusal.DATA),
    (Exception, Refusal.INTERNAL),
)

app = ClientApp()


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod for SecAgg+ stage messages; plain train messages pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def simulation_only(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The simulation's attack mod (attacks.py) for a simulated client; a deployed institution's
    node never imports it, whatever the run config says."""
    if not is_simulated(context.node_config):
        return call_next(msg, context)
    from fed_dp_lora.attacks import attack_mod

    return attack_mod(msg, context, call_next)


def refuse(msg: Message, code: Refusal, detail: str, context: Context, text: str | None = None) -> Message:
    """An error reply with a fixed text; the detail is logged where the institution reads it."""
    state_dir = context.node_config.get("state-dir")
    config = msg.content.config_records.get("config")
    local_log.refused(
        state_dir if isinstance(state_dir, str) else None,
        int(code),
        detail,
        {"round": None if config is None else config.get("server-round")},
    )
    return Message(Error(code=int(code), reason=text or REFUSAL_TEXT[code]), reply_to=msg)


@app.train(mods=[secagg_when_asked, simulation_only])
def train(msg: Message, context: Context) -> Message:
    """One round of DP-SGD on this client's records; refusals become error replies."""
    try:
        cfg = load_config(context.run_config)
    except ConfigError as err:  # a function of the server's own run config: its text may go back
        return refuse(msg, Refusal.CONFIG, str(err), context, f"{REFUSAL_TEXT[Refusal.CONFIG]}: {err}")
    try:
        request, secagg_config = decode(msg, cfg, context.node_id)
        memory = context.state.config_records.get(LEDGER_KEY)
        released = train_round(
            cfg, context.node_config, request, None if memory is None else InstitutionLedger.from_dict(dict(memory))
        )
        if released.ledger is not None:
            # context.state outlives this process (deployment starts one per message) and holds
            # a second copy of the ledger, which must agree with the one on disk.
            context.state[LEDGER_KEY] = ConfigRecord(released.ledger.to_dict())
        return Message(content=encode(cfg, request, released, secagg_config), reply_to=msg)
    except BaseException as err:  # noqa: BLE001 - every failure must become a fixed-text reply
        if not isinstance(err, Exception):
            raise
        code = next(c for kind, c in REFUSALS if isinstance(err, kind))
        return refuse(msg, code, f"{type(err).__name__}: {err}", context)


def decode(msg: Message, cfg: DictConfig, node_id: int) -> tuple[RoundRequest, dict | None]:
    """The server's request; refuses instructions that do not match the agreed protocol."""
    if cfg.secagg != is_legacy_fitins(msg.content):
        # Never answer a plain request with an individual update when SecAgg+ was agreed.
        raise InputRefused(
            f"the run says secagg={cfg.secagg} but the server sent "
            f"{'SecAgg+' if not cfg.secagg else 'plain'} instructions"
        )
    try:
        if cfg.secagg:
            state, config = secagg_fitins(msg.content)
        else:
            state = msg.content.array_records["arrays"].to_torch_state_dict()
            config = dict[str, Any](msg.content.config_records["config"])
        server_round = int(config.get("server-round", 0))
    except (KeyError, ValueError, TypeError) as err:
        raise InputRefused(f"malformed instructions: {err}") from err
    study = config.get("study-id")
    return RoundRequest(state, server_round, None if study is None else str(study), node_id), (
        config if cfg.secagg else None
    )


def encode(cfg: DictConfig, request: RoundRequest, released: Released, secagg_config: dict | None) -> RecordDict:
    """The reply's records: the update, the allowlisted metrics, and public node fields."""
    state = released.state
    if secagg_config is not None:
        margin = secagg_quantization_margin(state, float(cfg.secaggplus.clipping_range))
        return secagg_fitres(
            request.global_state,
            state,
            secagg_config,
            int(released.metrics[NUM_EXAMPLES]),
            released.metrics,
            quantization_margin=margin,
        )
    int8 = cfg.upload.compression == "int8"
    content = RecordDict(
        {
            "arrays": encode_int8_update(request.global_state, state) if int8 else ArrayRecord(state),
            "metrics": MetricRecord(dict[str, Any](released.metrics)),
        }
    )
    if int8:
        content[UPLOAD_KEY] = ConfigRecord({"encoding": INT8_UPDATE})
    if released.policy.name is not None:
        content[NODE_RECORD] = ConfigRecord(dict[str, Any](node_fields({"name": released.policy.name})))
    return content
