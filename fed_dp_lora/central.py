"""Central evaluation of the global adapter on data no client trains on, and adapter folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fed_dp_lora.config import ConfigError
from fed_dp_lora.data import holdout_split, label_names, load_table
from fed_dp_lora.models import build_model, load_tokenizer, load_trainable_state, trainable_state
from fed_dp_lora.training import Encoded, encode, evaluate, majority_baseline, record_losses


def central_test_table(cfg: DictConfig):
    """data.test_path, else the hold-out split of the configured source."""
    if cfg.data.test_path is not None:
        return load_table(cfg, path=str(cfg.data.test_path))
    if cfg.data.source == "file" and cfg.data.path is None:
        raise ConfigError("data.test_path: the server needs a central test set. Fix: set "
                          "data.test_path=/abs/test.csv (or data.path to hold out from)")
    return holdout_split(load_table(cfg), cfg)[1]


class CentralEvaluator:
    """The server's copy of the model: evaluates and saves each global adapter."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        classification = cfg.model.task == "classification"
        self.num_labels = len(label_names(cfg)) if classification else None
        self.model = build_model(cfg, self.num_labels)
        table = central_test_table(cfg)
        self.test = encode(table, load_tokenizer(cfg), cfg)
        self.majority = None
        if classification:
            labels = self.test.labels.numpy()
            # The server owns only the test set, so the baseline predicts its majority class:
            # if anything, an optimistic baseline.
            self.majority = majority_baseline(labels, labels, self.num_labels)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable_state(self.model, state)
        return evaluate(self.model, self.test, int(self.cfg.eval.batch_size))

    def losses(self, state: dict[str, torch.Tensor], data: Encoded) -> np.ndarray:
        load_trainable_state(self.model, state)
        return record_losses(self.model, data, int(self.cfg.eval.batch_size))

    def save_adapter(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        """A PEFT adapter folder: PeftModel.from_pretrained(base, folder) loads it."""
        load_trainable_state(self.model, state)
        self.model.save_pretrained(folder)

