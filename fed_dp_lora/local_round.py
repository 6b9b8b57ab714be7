"""One client's training round: its data, its ledger, DP-SGD, and what it reports.

No Flower types here: client_app.py converts records to and from these plain values.
Models and tokenized data are cached per process, so a simulation worker loads the frozen
base once and tokenizes each client's records once; every trainable tensor is overwritten
from the incoming global adapter, so the cache never leaks one client's state to another.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fed_dp_lora.attacks import attack, is_malicious
from fed_dp_lora.config import ConfigError, resolve_delta
from fed_dp_lora.data import client_partition, holdout_split, label_names, load_table
from fed_dp_lora.data.canaries import canary_words, client_canaries
from fed_dp_lora.models import build_model, load_tokenizer, load_trainable_state, trainable_state
from fed_dp_lora.privacy.accountant import PrivacyLedger, calibrate_noise
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import Encoded, encode, plan_steps, train_local

log = logging.getLogger(__name__)

# Opacus' full backward hooks warn on every backward when inputs do not require grad (they
# never do for frozen-base LoRA); the per-sample gradients are unaffected.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _key(cfg: DictConfig, *sections: str) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return json.dumps({s: plain[s] for s in sections}, sort_keys=True)


@lru_cache(maxsize=2)
def _cached_model(key: str) -> torch.nn.Module:
    cfg = OmegaConf.create(json.loads(key))
    num_labels = len(label_names(cfg)) if cfg.model.task == "classification" else None
    return build_model(cfg, num_labels)


def cached_model(cfg: DictConfig) -> torch.nn.Module:
    """The process-wide LoRA model for this model/LoRA/data config."""
    return _cached_model(_key(cfg, "model", "lora", "data", "train"))


@lru_cache(maxsize=64)
def _cached_client_data(key: str, data_path: str | None, partition: tuple[int, int] | None) -> Encoded:
    cfg = OmegaConf.create(json.loads(key))
    if data_path is not None:
        table = load_table(cfg, path=data_path)  # deployment: the institution's whole file
    else:
        train, _ = holdout_split(load_table(cfg), cfg)
        table = client_partition(train, cfg, *partition)
    tokenizer = load_tokenizer(cfg)
    if cfg.audit.enabled:
        num_labels = len(label_names(cfg)) if cfg.model.task == "classification" else None
        words = canary_words(tokenizer.get_vocab())
        table = pd.concat([table, client_canaries(cfg, num_labels, words, *partition)], ignore_index=True)
    return encode(table, tokenizer, cfg)


def client_data(cfg: DictConfig, node_config: Mapping[str, Any]) -> Encoded:
    """This client's tokenized records: `data-path` in deployment, a partition in simulation.

    With the audit on, the client's included canaries are added to its records.
    """
    key = _key(cfg, "model", "data", "train", "seed", "audit")
    has_slot = "partition-id" in node_config and "num-partitions" in node_config
    slot = (int(node_config["partition-id"]), int(node_config["num-partitions"])) if has_slot else None
    if "data-path" in node_config:
        if cfg.audit.enabled and slot is None:
            raise ConfigError(
                "audit.enabled: each canary must go to exactly one institution, and this SuperNode "
                "has no slot. Fix: add partition-id=<i> num-partitions=<n> to its --node-config"
            )
        return _cached_client_data(key, str(node_config["data-path"]), slot)
    if slot is None:
        raise ConfigError(
            "node config: neither data-path nor partition-id is set. Fix: start the SuperNode "
            "with --node-config 'data-path=\"/path/to/records.csv\"'"
        )
    return _cached_client_data(key, None, slot)


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    ledger: dict[str, Any] | None = field(default=None)


def _class_weights(cfg: DictConfig, device: torch.device) -> torch.Tensor | None:
    if cfg.model.task != "classification" or cfg.data.class_weights is None:
        return None
    return torch.tensor([float(w) for w in cfg.data.class_weights], device=device)


def train_round(
    cfg: DictConfig,
    node_config: Mapping[str, Any],
    global_state: dict[str, torch.Tensor],
    ledger_state: Mapping[str, Any] | None,
) -> RoundResult:
    """Train this client on the global adapter; raises BudgetExceeded before any training."""
    data = client_data(cfg, node_config)
    n = len(data)
    rate, steps = plan_steps(n, int(cfg.train.batch_size), float(cfg.train.epochs))
    model = cached_model(cfg)
    load_trainable_state(model, global_state)
    device = next(p for p in model.parameters() if p.requires_grad).device
    metrics: dict[str, float] = {"num-examples": n, "sample-rate": rate}
    if "partition-id" in node_config:
        metrics["partition-id"] = int(node_config["partition-id"])
    ledger = None
    if cfg.privacy.enabled:
        delta = resolve_delta(cfg, n)
        ledger = (
            PrivacyLedger.from_dict(dict(ledger_state))
            if ledger_state
            else PrivacyLedger(accountant=str(cfg.privacy.accountant), delta=delta)
        )
        if ledger.delta != delta or ledger.accountant != cfg.privacy.accountant:
            raise ConfigError(
                "privacy: this client's ledger was kept with delta "
                f"{ledger.delta:g} / {ledger.accountant}, the run now asks for {delta:g} / "
                f"{cfg.privacy.accountant}. Fix: keep privacy settings fixed within a run"
            )
        if cfg.privacy.noise_multiplier is not None:
            sigma = float(cfg.privacy.noise_multiplier)
        elif ledger.history:
            sigma = ledger.history[-1][0]  # calibrated in this client's first round for the whole run
        else:
            sigma = calibrate_noise(
                float(cfg.privacy.epsilon), delta, rate, steps * int(cfg.rounds), str(cfg.privacy.accountant)
            )
        budget = None if cfg.privacy.epsilon is None else float(cfg.privacy.epsilon)
        ledger.check_budget((sigma, rate, steps), budget)
        engine: GradientEngine = PrivateGradientEngine(
            model, rate * n, float(cfg.privacy.clip_norm), sigma
        )
        metrics.update({"noise-multiplier": sigma, "delta": delta})
    else:
        engine = GradientEngine(model, rate * n)
    try:
        stats = train_local(engine, data, cfg, rate, steps, _class_weights(cfg, device))
    finally:
        engine.detach()
    if ledger is not None:
        ledger.record(engine.noise_multiplier, rate, stats.steps)  # type: ignore[attr-defined]
        metrics.update({"epsilon": ledger.epsilon(), "steps-total": ledger.steps})
    metrics.update({"steps": stats.steps, "train-loss": stats.mean_loss, "empty-batches": stats.empty_batches})
    state = trainable_state(model)
    if is_malicious(cfg, node_config):
        # A simulated attacker: it trained (and spent budget) like everyone, then lies.
        state = attack(str(cfg.attack.kind), global_state, state, float(cfg.attack.scale))
    return RoundResult(state, metrics, ledger.to_dict() if ledger else None)
