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
from fed_dp_lora.models import ModelSpec, build, cache_dir, load_tokenizer
from fed_dp_lora.node_policy import NodePolicy, PolicyError
from fed_dp_lora.probe import LinearProbe
from fed_dp_lora.probe.features import head_features
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
        return plan_steps(self.records, cfg.train.batch_size, cfg.train.epochs)


@dataclass(frozen=True)
class TableSpec:
    """What building a client's token table reads: the data section, the tokenizer, the canaries.

    The table caches are keyed by this value, and the builder reads a configuration rebuilt
    from these fields alone (:meth:`config`, struct mode), so a setting it reads cannot be
    missing from the key: the read fails instead.
    """

    data: str  # the whole data section as sorted JSON: the data layer reads most of it
    model_name: str  # the tokenizer
    task: str
    max_length: int
    method: str  # train.method: only the linear probe's records carry data.columns' features
    seed: int  # the hold-out split and the partitions
    audit_enabled: bool
    audit_canaries: int
    audit_seed: int

    @classmethod
    def of(cls, cfg: DictConfig) -> TableSpec:
        data = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
        a = cfg.audit
        return cls(
            data,
            cfg.model.name,
            cfg.model.task,
            cfg.train.max_length,
            cfg.train.method,
            cfg.seed,
            a.enabled,
            a.canaries,
            a.seed,
        )

    def config(self) -> DictConfig:
        cfg = OmegaConf.create(
            {
                "data": json.loads(self.data),
                "model": {"name": self.model_name, "task": self.task},
                "train": {"max_length": self.max_length, "method": self.method},
                "seed": self.seed,
                "audit": {"enabled": self.audit_enabled, "canaries": self.audit_canaries, "seed": self.audit_seed},
            }
        )
        OmegaConf.set_struct(cfg, True)
        return cfg


@lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec) -> torch.nn.Module:
    return build(spec)


def model_spec(cfg: DictConfig) -> ModelSpec:
    """What builds this configuration's model, the head sized by the run's class names."""
    num_labels = len(label_names(cfg)) if cfg.model.task == "classification" else None
    return ModelSpec.of(cfg, num_labels)


def cached_model(cfg: DictConfig) -> torch.nn.Module:
    """The process-wide model (linear probe or LoRA) for this configuration, keyed by what builds it.

    It is a working copy: every round loads the incoming global adapter into it first, and
    configurations that build the same model share it.
    """
    return _cached_model(model_spec(cfg))


def _assigned_canaries(cfg: DictConfig, partition: tuple[int, int] | None) -> int:
    """How many audit canaries may join this client: public (the coins that pick them are not)."""
    if not cfg.audit.enabled or partition is None:
        return 0
    return len(range(partition[0], cfg.audit.canaries, partition[1]))


@lru_cache(maxsize=64)
def _cached_table(
    spec: TableSpec, data_path: str | None, partition: tuple[int, int] | None, version: str = ""
) -> tuple[Encoded, str, int]:
    """(tokens, what was dropped as JSON, how many records came from the data before canaries).
    `version` (the file's size and time) keeps a process from reusing an edited file's tokens."""
    cfg = spec.config()
    if data_path is not None:
        table = load_table(cfg, path=data_path)  # deployment: the institution's whole file
    else:
        assert partition is not None, "a simulated client always has its partition-id (node_policy)"
        train, _ = holdout_split(load_table(cfg), cfg)
        table = client_partition(train, cfg, *partition)
    dropped, real = dict(table.attrs.get("dropped", {})), len(table)
    tokenizer = load_tokenizer(cfg)
    if cfg.audit.enabled:
        assert partition is not None, "client_data refuses an audit on a node without a slot"
        num_labels = len(label_names(cfg)) if cfg.model.task == "classification" else None
        words = canary_words(tokenizer.get_vocab())
        table = pd.concat([table, client_canaries(cfg, num_labels, words, *partition)], ignore_index=True)
    return encode(table, tokenizer, cfg), json.dumps(dropped), real


def client_data(cfg: DictConfig, policy: NodePolicy) -> ClientData:
    """This client's tokenized records: `data-path` in deployment, a partition in simulation."""
    spec = TableSpec.of(cfg)
    if policy.deployment:
        if cfg.audit.enabled and policy.partition is None:
            raise PolicyError(
                "node-config partition-id: audit.enabled needs each canary in exactly one institution, and "
                "this SuperNode has no slot. Fix: add partition-id=<i> num-partitions=<n> to its --node-config"
            )
        encoded, dropped, _ = (
            _disk_cached(spec, policy) if policy.state_dir else _cached_table(spec, policy.data_path, policy.partition)
        )
        records = int(policy.records)  # type: ignore[arg-type]  # required in deployment (node_policy)
        if len(encoded) > records:
            raise PolicyError(
                f"node-config records: the file holds {len(encoded)} usable records, more than "
                f"the {records} declared. Fix: declare records >= {len(encoded)}"
            )
    else:
        encoded, dropped, real = _cached_table(spec, None, policy.partition)
        # Simulation: partitions of a public data set, so their sizes are public.
        records = real + _assigned_canaries(cfg, policy.partition)
    return ClientData(encoded, records, policy, json.loads(dropped))


def _disk_cached(spec: TableSpec, policy: NodePolicy) -> tuple[Encoded, str, int]:
    """Tokenized once per file version, kept in the institution's state dir.

    In deployment each round is a new process, so the in-process cache never hits; this skips
    reading the file, loading the tokenizer and tokenizing. The file's size and modification
    time are part of the key: an edited file is read again.
    """
    path = Path(str(policy.data_path))
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return _cached_table(spec, policy.data_path, policy.partition)  # raises the DataError
    version = json.dumps([asdict(spec), str(path.resolve()), stat.st_size, stat.st_mtime_ns, policy.partition])
    cache = Path(str(policy.state_dir)) / f"tokens-{hashlib.sha256(version.encode()).hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return Encoded(**saved["encoded"]), saved["dropped"], int(saved["real"])
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("token cache %s unreadable (%s); tokenizing again", cache, err)
    encoded, dropped, real = _cached_table(spec, policy.data_path, policy.partition, version)
    Path(str(policy.state_dir)).mkdir(parents=True, exist_ok=True)
    write_atomic(
        cache, lambda handle: torch.save({"encoded": asdict(encoded), "dropped": dropped, "real": real}, handle)
    )
    return encoded, dropped, real


def client_features(cfg: DictConfig, policy: NodePolicy, data: ClientData, model: torch.nn.Module) -> torch.Tensor:
    """The linear probe's features of this client's records, cached where the records live: the
    institution's state dir in deployment (never sent), the user cache dir for simulated clients
    (partitions of a public data set)."""
    folder = Path(str(policy.state_dir)) if policy.deployment and policy.state_dir else cache_dir() / "features"
    assert isinstance(model, LinearProbe)  # only the probe's round asks for features
    return head_features(model, data.encoded, folder, slots=data.records)
