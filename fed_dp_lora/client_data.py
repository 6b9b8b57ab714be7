"""A client's records and model for a round, cached per process (and, in deployment, on disk).

A simulation worker loads the frozen base once and tokenizes each client's records once; every
trainable tensor is overwritten from the incoming global adapter, so the cache never leaks one
client's state to another. In deployment each round is a new process, so the tokenized file is
kept in the institution's state dir, once per file version.

`ClientData.records` is the public slot count the round samples over: the institution's declared
`records` in deployment, the partition size of a public data set in simulation. The private
count of usable records never leaves this module except into the institution's local log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fed_dp_lora.data import client_partition, holdout_split, label_names, load_table
from fed_dp_lora.data.canaries import canary_words, client_canaries
from fed_dp_lora.files import write_atomic
from fed_dp_lora.models import build_model, cache_dir, load_tokenizer
from fed_dp_lora.node_policy import NodePolicy, PolicyError
from fed_dp_lora.probe.features import cached_features
from fed_dp_lora.training import Encoded, encode, plan_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientData:
    """Tokenized records of one client and the public count its sampling is planned on."""

    encoded: Encoded
    records: int
    policy: NodePolicy
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def partition(self) -> int | None:
        return None if self.policy.partition is None else self.policy.partition[0]

    def plan(self, cfg: DictConfig) -> tuple[float, int]:
        """(q, steps this round) from public values only."""
        return plan_steps(self.records, int(cfg.train.batch_size), float(cfg.train.epochs))


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


def _assigned_canaries(cfg: DictConfig, partition: tuple[int, int] | None) -> int:
    """How many audit canaries may join this client: public (the coins that pick them are not)."""
    if not cfg.audit.enabled or partition is None:
        return 0
    return len(range(partition[0], int(cfg.audit.canaries), partition[1]))


@lru_cache(maxsize=64)
def _cached_table(key: str, data_path: str | None, partition: tuple[int, int] | None,
                  version: str = "") -> tuple[Encoded, str, int]:
    """(tokens, what was dropped as JSON, how many records came from the data before canaries).
    `version` (the file's size and time) keeps a process from reusing an edited file's tokens."""
    cfg = OmegaConf.create(json.loads(key))
    if data_path is not None:
        table = load_table(cfg, path=data_path)  # deployment: the institution's whole file
    else:
        train, _ = holdout_split(load_table(cfg), cfg)
        table = client_partition(train, cfg, *partition)
    dropped, real = dict(table.attrs.get("dropped", {})), len(table)
    tokenizer = load_tokenizer(cfg)
    if cfg.audit.enabled:
        num_labels = len(label_names(cfg)) if cfg.model.task == "classification" else None
        words = canary_words(tokenizer.get_vocab())
        table = pd.concat([table, client_canaries(cfg, num_labels, words, *partition)], ignore_index=True)
    return encode(table, tokenizer, cfg), json.dumps(dropped), real


def client_data(cfg: DictConfig, policy: NodePolicy) -> ClientData:
    """This client's tokenized records: `data-path` in deployment, a partition in simulation."""
    key = _key(cfg, "model", "data", "train", "seed", "audit")
    if policy.deployment:
        if cfg.audit.enabled and policy.partition is None:
            raise PolicyError(
                "node-config partition-id: audit.enabled needs each canary in exactly one institution, and "
                "this SuperNode has no slot. Fix: add partition-id=<i> num-partitions=<n> to its --node-config"
            )
        encoded, dropped, _ = _disk_cached(key, policy) if policy.state_dir else \
            _cached_table(key, policy.data_path, policy.partition)
        records = int(policy.records)  # type: ignore[arg-type]  # required in deployment (node_policy)
        if len(encoded) > records:
            raise PolicyError(f"node-config records: the file holds {len(encoded)} usable records, more than "
                              f"the {records} declared. Fix: declare records >= {len(encoded)}")
    else:
        encoded, dropped, real = _cached_table(key, None, policy.partition)
        # Simulation: partitions of a public data set, so their sizes are public.
        records = real + _assigned_canaries(cfg, policy.partition)
    return ClientData(encoded, records, policy, json.loads(dropped))


def _disk_cached(key: str, policy: NodePolicy) -> tuple[Encoded, str, int]:
    """Tokenized once per file version, kept in the institution's state dir.

    In deployment each round is a new process, so the in-process cache never hits; this skips
    reading the file, loading the tokenizer and tokenizing. The file's size and modification
    time are part of the key: an edited file is read again.
    """
    path = Path(str(policy.data_path))
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return _cached_table(key, policy.data_path, policy.partition)  # raises the DataError
    version = json.dumps([key, str(path.resolve()), stat.st_size, stat.st_mtime_ns, policy.partition])
    cache = Path(str(policy.state_dir)) / f"tokens-{hashlib.sha256(version.encode()).hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return Encoded(**saved["encoded"]), saved["dropped"], int(saved["real"])
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("token cache %s unreadable (%s); tokenizing again", cache, err)
    encoded, dropped, real = _cached_table(key, policy.data_path, policy.partition, version)
    Path(str(policy.state_dir)).mkdir(parents=True, exist_ok=True)
    write_atomic(cache, lambda handle: torch.save({"encoded": asdict(encoded), "dropped": dropped, "real": real},
                                                  handle))
    return encoded, dropped, real


def client_features(cfg: DictConfig, policy: NodePolicy, data: ClientData, model: torch.nn.Module) -> torch.Tensor:
    """The linear probe's features of this client's records, cached where the records live: the
    institution's state dir in deployment (never sent), the user cache dir for simulated clients
    (partitions of a public data set)."""
    folder = Path(str(policy.state_dir)) if policy.deployment and policy.state_dir else cache_dir() / "features"
    return cached_features(model, data.encoded, folder, slots=data.records)  # type: ignore[arg-type]
