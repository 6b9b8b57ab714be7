"""Records for training and evaluation: sources, hold-out and client partitions."""

from fed_dp_lora.data.partition import client_partition, holdout_split
from fed_dp_lora.data.sources import DataError, label_names, load_table

__all__ = ["DataError", "client_partition", "holdout_split", "label_names", "load_table"]
