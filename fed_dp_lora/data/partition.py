"""Hold-out and client partitions, through flwr-datasets partitioners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from omegaconf import DictConfig

from fed_dp_lora.config import ConfigError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def holdout_split(table: pd.DataFrame, cfg: DictConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off the central test set (stratified for classification) with the run's seed.

    The split depends only on the data and the seed, so the server and every simulated
    client compute the same one and no client ever trains on a test record. A table with a
    `split` column (a source published with its own test set) keeps that split.
    """
    if "split" in table.columns:
        test = table[table["split"] == "test"]
        train = table[table["split"] != "test"].sample(frac=1.0, random_state=int(cfg.seed))
        return train.reset_index(drop=True), test.reset_index(drop=True)
    frac = float(cfg.data.test_fraction)
    rng_seed = int(cfg.seed)
    if "label" in table.columns:
        test = table.groupby("label", group_keys=False).sample(frac=frac, random_state=rng_seed)
    else:
        test = table.sample(frac=frac, random_state=rng_seed)
    # Shuffled, because flwr-datasets' IidPartitioner takes contiguous shards.
    train = table.drop(index=test.index).sample(frac=1.0, random_state=rng_seed)
    return train.reset_index(drop=True), test.sort_index().reset_index(drop=True)


def _partitioner(cfg: DictConfig, num_partitions: int) -> Partitioner:
    # Imported here: flwr_datasets loads seaborn and matplotlib (~2 s), which a deployment
    # ClientApp (a new process every round, reading its own file) never needs.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    kind = cfg.data.partitioner
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cfg.data.dirichlet_alpha),
            min_partition_size=1,
            seed=int(cfg.seed),
        )
    return NaturalIdPartitioner(partition_by=str(cfg.data.partition_column))


def client_partition(train: pd.DataFrame, cfg: DictConfig, partition_id: int, num_partitions: int) -> pd.DataFrame:
    """Records of one simulated client; errors name the key to change."""
    if num_partitions > len(train):
        raise ConfigError(
            f"num-partitions: {num_partitions} clients for {len(train)} training records. Fix: "
            "use fewer simulated SuperNodes (--federation-config num-supernodes=...)"
        )
    if cfg.data.partitioner == "column":
        column = str(cfg.data.partition_column)
        if column not in train.columns:
            raise ConfigError(
                f"data.partition_column: column {column!r} is not in the data "
                f"({list(train.columns)}). Fix: name an existing column"
            )
        # Missing ids form one "unknown" institution (as in the credit table): left as NaN,
        # nunique() skipped them and the partitioner crashed sorting None among strings.
        train = train.assign(**{column: train[column].astype(object).fillna("unknown").astype(str)})
        groups = train[column].nunique()
        if groups != num_partitions:
            raise ConfigError(
                f"data.partition_column: {column!r} has {groups} values but the federation has "
                f"{num_partitions} clients. Fix: run with num-supernodes={groups}"
            )
    from datasets import Dataset

    partitioner = _partitioner(cfg, num_partitions)
    partitioner.dataset = Dataset.from_pandas(train, preserve_index=False)
    part = partitioner.load_partition(partition_id).to_pandas()
    if part.empty:
        raise ConfigError(
            f"data.partitioner: client {partition_id} received no records. Fix: raise "
            "data.dirichlet_alpha or use fewer clients"
        )
    return part.reset_index(drop=True)
