"""Server strategies: Strategy subclasses of Flower's, built from the `strategy` config group."""

from fed_dp_lora.strategies.averaging import AdapterFedAvg, CheckedAggregation
from fed_dp_lora.strategies.dp_fedavg import AdapterDPFedAvg, UserLevelDP
from fed_dp_lora.strategies.factory import build_strategy
from fed_dp_lora.strategies.robust import AdapterMedian, AdapterMultiKrum, AdapterTrimmedMean

__all__ = [
    "AdapterDPFedAvg",
    "AdapterFedAvg",
    "AdapterMedian",
    "AdapterMultiKrum",
    "AdapterTrimmedMean",
    "CheckedAggregation",
    "UserLevelDP",
    "build_strategy",
]
