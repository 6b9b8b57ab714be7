"""Central evaluation of the global adapter on data no client trains on, and adapter folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate.utils import find_executable_batch_size
from omegaconf import DictConfig

from fed_dp_lora.advice import length_report
from fed_dp_lora.config import ConfigError
from fed_dp_lora.data import holdout_split, label_names, load_table
from fed_dp_lora.files import write_dir_atomic
from fed_dp_lora.models import build_model, cache_dir, load_tokenizer, load_trainable_state, trainable_state
from fed_dp_lora.probe import LinearProbe
from fed_dp_lora.probe.features import head_features
from fed_dp_lora.training import Encoded, classification_metrics, encode, evaluate, majority_baseline, record_losses

T = TypeVar("T")

# eval.batch_size=auto on a CPU. Measured with scripts/bench_eval.py (the default task's 891 test
# records, 1 thread, median of 3, three runs): batches of 32 took 0.81-0.84x the time of 256,
# the least of 8 to 256; on a CPU a small batch's activations stay in cache, so a larger batch
# does not pay.
CPU_EVAL_BATCH = 32
# eval.batch_size=auto on a GPU: the largest batch that fits, found by halving from here on
# out-of-memory (accelerate's find_executable_batch_size), once per server.
GPU_EVAL_START = 1024


def eval_batch_size(setting: int | str, device: torch.device) -> int | None:
    """eval.batch_size as a number of records; None: find the largest that fits on the GPU."""
    if setting != "auto":
        return int(setting)
    return None if device.type == "cuda" else CPU_EVAL_BATCH


def largest_fitting(run: Callable[[int], T], start: int = GPU_EVAL_START) -> tuple[T, int]:
    """run(batch_size) with the largest batch size, halving from `start`, that does not run out of memory."""
    size = start

    def halve() -> int:
        nonlocal size
        size //= 2
        return size

    @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
    def attempt(batch_size: int) -> tuple[T, int]:
        return run(batch_size), batch_size

    return attempt()


def central_test_table(cfg: DictConfig):
    """data.test_path, else the hold-out split of the configured source."""
    if cfg.data.test_path is not None:
        return load_table(cfg, path=str(cfg.data.test_path))
    if cfg.data.source == "file" and cfg.data.path is None:
        raise ConfigError(
            "data.test_path: the server needs a central test set. Fix: set "
            "data.test_path=/abs/test.csv (or data.path to hold out from)"
        )
    return holdout_split(load_table(cfg), cfg)[1]


class CentralEvaluator:
    """The server's copy of the model: evaluates and saves each global adapter."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.length_info: str | None = None
        self.length_warning: str | None = None
        classification = cfg.model.task == "classification"
        self.num_labels = len(label_names(cfg)) if classification else None
        self.model = build_model(cfg, self.num_labels)
        self.batch_size = eval_batch_size(cfg.eval.batch_size, next(self.model.parameters()).device)
        table = central_test_table(cfg)
        tokenizer = load_tokenizer(cfg)
        self.test = encode(table, tokenizer, cfg)
        if classification:
            lengths = np.array([len(ids) for ids in tokenizer(list(table["text"]), verbose=False)["input_ids"]])
            self.length_info, self.length_warning = length_report(lengths, int(cfg.train.max_length))
        # The linear probe's head is evaluated on the test set's cached features (the server's own).
        self.test_features = (
            head_features(self.model, self.test, cache_dir() / "features")
            if isinstance(self.model, LinearProbe)
            else None
        )
        self.majority = None
        if classification:
            labels = self.test.labels.numpy()
            # The server owns only the test set, so the baseline predicts its majority class:
            # if anything, an optimistic baseline.
            self.majority = majority_baseline(labels, labels, len(label_names(cfg)))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable_state(self.model, state)
        if self.test_features is not None:
            assert isinstance(self.model, LinearProbe)  # test features exist for the linear probe only
            with torch.no_grad():
                logits = self.model.classifier(self.test_features.to(self.model.classifier.weight.device))
            return classification_metrics(self.test.labels.numpy(), torch.softmax(logits.float(), -1).cpu().numpy())
        return self._batched(lambda batch_size: evaluate(self.model, self.test, batch_size))

    def losses(self, state: dict[str, torch.Tensor], data: Encoded) -> np.ndarray:
        load_trainable_state(self.model, state)
        return self._batched(lambda batch_size: record_losses(self.model, data, batch_size))

    def _batched(self, run: Callable[[int], T]) -> T:
        if self.batch_size is not None:
            return run(self.batch_size)
        result, self.batch_size = largest_fitting(run)
        return result

    def save_adapter(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        """A PEFT adapter folder: PeftModel.from_pretrained(base, folder) loads it."""
        load_trainable_state(self.model, state)
        write_dir_atomic(folder, lambda tmp: self.model.save_pretrained(str(tmp)))
