"""Server strategies: Strategy subclasses of Flower's, built from the `strategy` config group."""

from fed_dp_lora.strategies.averaging import AdapterFedAvg, build_strategy

__all__ = ["AdapterFedAvg", "build_strategy"]
