"""One client's training round: its data, its ledger, DP-SGD, and what it reports.

No Flower types here: client_app.py converts records to and from these plain values.
Models and tokenized data are cached per process, so a simulation worker loads the frozen
base once and tokenizes each client's records once; every trainable tensor is overwritten
from the incoming global adapter, so the cache never leaks one client's state to another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fed_dp_lora.attacks import attack, is_malicious
from fed_dp_lora.audit.release import release_canaries
from fed_dp_lora.config import ConfigError, NodeSettings, apply_node_config, resolve_delta
from fed_dp_lora.data import client_partition, holdout_split, label_names, load_table
from fed_dp_lora.data.canaries import canary_words, client_canaries
from fed_dp_lora.models import build_model, load_tokenizer, load_trainable_state, trainable_state
from fed_dp_lora.privacy.accountant import PrivacyLedger, calibrate_noise
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine
from fed_dp_lora.privacy.ledger_store import ClientStateDir, reconcile, state_digest
from fed_dp_lora.privacy.streams import institution_secret, model_seed, round_generators, simulation_secret
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
    return _client_data(*apply_node_config(cfg, node_config))


def _client_data(cfg: DictConfig, node: NodeSettings) -> Encoded:
    key = _key(cfg, "model", "data", "train", "seed", "audit")
    if node.data_path is not None:
        if cfg.audit.enabled and node.partition is None:
            raise ConfigError(
                "audit.enabled: each canary must go to exactly one institution, and this SuperNode "
                "has no slot. Fix: add partition-id=<i> num-partitions=<n> to its --node-config"
            )
        if node.state_dir is not None:
            return _disk_cached_client_data(key, node)
        return _cached_client_data(key, node.data_path, node.partition)
    return _cached_client_data(key, None, node.partition)


def _disk_cached_client_data(key: str, node: NodeSettings) -> Encoded:
    """Tokenized once per file version, kept in the institution's state dir.

    In deployment each round is a new process, so the in-process cache never hits; this skips
    reading the file, loading the tokenizer and tokenizing (~1 s per round on the default task).
    The file's size and modification time are part of the key: an edited file is read again.
    """
    path = Path(str(node.data_path))
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return _cached_client_data(key, node.data_path, node.partition)  # raises the DataError
    version = json.dumps([key, str(path.resolve()), stat.st_size, stat.st_mtime_ns, node.partition])
    cache = Path(str(node.state_dir)) / f"tokens-{hashlib.sha256(version.encode()).hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            return Encoded(**torch.load(cache, weights_only=True))
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("token cache %s unreadable (%s); tokenizing again", cache, err)
    data = _cached_client_data(key, node.data_path, node.partition)
    tmp = cache.with_name(cache.name + ".tmp")
    Path(str(node.state_dir)).mkdir(parents=True, exist_ok=True)
    torch.save(asdict(data), tmp)
    os.replace(tmp, cache)
    return data


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    ledger: dict[str, Any] | None = field(default=None)


def _class_weights(cfg: DictConfig, device: torch.device) -> torch.Tensor | None:
    if cfg.model.task != "classification" or cfg.data.class_weights is None:
        return None
    return torch.tensor([float(w) for w in cfg.data.class_weights], device=device)


_process_started = True  # the first round in this process pays for Python start-up and imports


def _startup_seconds() -> float:
    """Seconds from this process' start to now (psutil ships with Flower's simulation extra)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def _client_secret(cfg: DictConfig, node: NodeSettings, store: ClientStateDir | None) -> bytes | None:
    if cfg.privacy.seeded_noise and node.partition is not None:
        return simulation_secret(int(cfg.seed), node.partition[0])  # refused in deployment (config.py)
    if store is not None:
        return institution_secret(store.secret(), store.study)
    return None  # no place to keep a key: fresh OS entropy each round


def train_round(
    cfg: DictConfig,
    node_config: Mapping[str, Any],
    global_state: dict[str, torch.Tensor],
    ledger_state: Mapping[str, Any] | None,
    server_round: int = 0,
    study: str | None = None,
) -> RoundResult:
    """Train this client on the global adapter; raises BudgetExceeded before any training.

    `server_round` and `study` (sent by the server) key the on-disk ledger, the random streams
    and the kept release; without them (direct calls in tests) nothing is persisted and the
    streams come from OS entropy.
    """
    global _process_started
    started = time.perf_counter()
    timing = {"startup-seconds": _startup_seconds() if _process_started else 0.0}
    _process_started = False
    cfg, node = apply_node_config(cfg, node_config)
    store = ClientStateDir(node.state_dir, study) if node.state_dir and study and server_round else None
    # One round at a time per institution: a ClientApp of a stopped run may still be finishing
    # when the resumed run asks for the same round; it must see the ledger the other wrote.
    with store.locked() if store is not None else contextlib.nullcontext():
        result = _train_round(cfg, node, node_config, store, global_state, ledger_state, server_round, started)
    result.metrics.update(timing)
    return result


def _train_round(
    cfg: DictConfig,
    node: NodeSettings,
    node_config: Mapping[str, Any],
    store: ClientStateDir | None,
    global_state: dict[str, torch.Tensor],
    ledger_state: Mapping[str, Any] | None,
    server_round: int,
    started: float,
) -> RoundResult:
    data = _client_data(cfg, node)
    n = len(data)
    rate, steps = plan_steps(n, int(cfg.train.batch_size), float(cfg.train.epochs))
    model = cached_model(cfg)
    load_trainable_state(model, global_state)
    device = next(p for p in model.parameters() if p.requires_grad).device
    metrics: dict[str, float] = {"num-examples": n, "sample-rate": rate, "replayed": 0.0}
    if node.partition is not None:
        metrics["partition-id"] = node.partition[0]
    secret = _client_secret(cfg, node, store) if server_round else None
    sampling, noise = round_generators(secret, server_round, device) if secret else (None, None)
    canaries = release_canaries(cfg, node.partition, model, rate, sampling)  # None unless audited
    if secret:
        torch.manual_seed(model_seed(secret, server_round))  # dropout
    ledger = None
    digest = state_digest(global_state) if store is not None else ""
    if cfg.privacy.enabled:
        delta = resolve_delta(cfg, n)
        memory = PrivacyLedger.from_dict(dict(ledger_state)) if ledger_state else None
        ledger = reconcile(memory, store.load_ledger() if store else None, store.ledger_path if store else None)
        ledger = ledger or PrivacyLedger(accountant=str(cfg.privacy.accountant), delta=delta)
        if ledger.delta != delta or ledger.accountant != cfg.privacy.accountant:
            raise ConfigError(
                "privacy: this client's ledger was kept with delta "
                f"{ledger.delta:g} / {ledger.accountant}, the run now asks for {delta:g} / "
                f"{cfg.privacy.accountant}. Fix: keep privacy settings fixed within a run"
            )
        if store is not None and server_round in ledger.rounds:
            kept = store.release(server_round, digest)
            if kept is not None:
                # Same round, same global adapter: resend what was released; nothing new leaks.
                log.info("Round %d was already trained here; resending the kept update", server_round)
                state, kept_metrics = kept
                return RoundResult(state, {**kept_metrics, "replayed": 1.0}, ledger.to_dict())
            log.warning("Round %d was already trained here from another global adapter; training "
                        "again is a new release and is counted again", server_round)
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
            model, rate * n, float(cfg.privacy.clip_norm), sigma, generator=noise, extra=canaries
        )
        metrics.update({"noise-multiplier": sigma, "delta": delta})
    else:
        engine = GradientEngine(model, rate * n, extra=canaries)
    loaded = time.perf_counter()
    try:
        stats = train_local(engine, data, cfg, rate, steps, _class_weights(cfg, device), generator=sampling)
    finally:
        engine.detach()
    if ledger is not None:
        ledger.record(engine.noise_multiplier, rate, stats.steps, server_round)  # type: ignore[attr-defined]
        if store is not None:
            store.save_ledger(ledger)  # on disk before the update can leave this client
        metrics.update({"epsilon": ledger.epsilon(), "steps-total": ledger.steps})
    metrics.update({"steps": stats.steps, "train-loss": stats.mean_loss, "empty-batches": stats.empty_batches})
    state = trainable_state(model)
    if is_malicious(cfg, node_config):
        # A simulated attacker: it trained (and spent budget) like everyone, then lies.
        state = attack(str(cfg.attack.kind), global_state, state, float(cfg.attack.scale))
    metrics.update({"load-seconds": loaded - started, "train-seconds": time.perf_counter() - loaded})
    if store is not None and ledger is not None:
        store.save_release(server_round, digest, state, metrics)
    return RoundResult(state, metrics, ledger.to_dict() if ledger else None)
