"""Local training and evaluation: tokenization, Poisson batches, per-sample losses.

The privacy unit is one record (one sequence): losses are computed per record from the
logits, never from the model's batch-mean ``.loss`` (which divides every per-sample gradient
by the number of tokens in the batch, so clipping never bites).
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from torch import nn
from transformers import PreTrainedTokenizerBase

from fed_dp_lora.data.columns import column_features, declared
from fed_dp_lora.privacy.engine import GradientEngine

IGNORE = -100


@dataclass
class Encoded:
    """A tokenized dataset: padded tensors, one row per record."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # class index per record, or token labels (IGNORE outside the response)
    pad_token_id: int = 0
    columns: torch.Tensor | None = None  # data.columns' features per record (the linear probe's head reads them)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Rows `index`, trimmed to the longest sequence among them (evaluation only).

        On CUDA the rows go through pinned memory, so the copy to the GPU is asynchronous.
        """
        mask = self.attention_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1)
        rows = {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[index] if self.labels.dim() == 1 else self.labels[index, :width],
        }
        if self.columns is not None:
            rows["columns"] = self.columns[index]
        return _to_device(rows, device)

    def slots(self, index: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows for Poisson slots `index` at full width, and which of them are records.

        A slot at or past len(self) is a padding row (one attended pad token, a label that adds
        no loss): batches keep a shape that depends only on public quantities, so the time a
        step takes does not depend on which records, or how many, the data holds.
        """
        real = index < len(self)
        rows = self._padding(len(index))
        if real.any():
            picked = index[real]
            rows["input_ids"][real] = self.input_ids[picked]
            rows["attention_mask"][real] = self.attention_mask[picked]
            rows["labels"][real] = self.labels[picked]
            if self.columns is not None:
                rows["columns"][real] = self.columns[picked]
        return _to_device(rows, device), real

    def _padding(self, count: int) -> dict[str, torch.Tensor]:
        width = self.input_ids.shape[1]
        mask = torch.zeros((count, width), dtype=self.attention_mask.dtype)
        mask[:, 0] = 1
        labels = (
            torch.zeros(count, dtype=torch.long)
            if self.labels.dim() == 1
            else torch.full((count, width), IGNORE, dtype=torch.long)
        )
        rows = {
            "input_ids": torch.full((count, width), self.pad_token_id, dtype=torch.long),
            "attention_mask": mask,
            "labels": labels,
        }
        if self.columns is not None:
            rows["columns"] = torch.zeros((count, self.columns.shape[1]), dtype=self.columns.dtype)
        return rows


def _to_device(rows: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in rows.items()}
    return {k: v.to(device) for k, v in rows.items()}


def compute_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA GPU that supports it, else fp32.

    Only the forward runs under it; per-record losses are taken in fp32 from the logits, and the
    engine clips fp32 copies of the per-sample gradients, so the clipping bound holds exactly
    for what is summed. On CPU bf16 matmuls are slower than fp32 here, so CPU stays fp32.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode(table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig) -> Encoded:
    """Tokenize once per dataset (callers cache the result across rounds)."""
    max_length = int(cfg.train.max_length)
    if cfg.model.task == "classification":
        enc = tokenizer(
            list(table["text"]),
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        labels = torch.tensor(table["label"].to_numpy(), dtype=torch.long)
        columns = column_features(table, declared(cfg))
        return Encoded(enc["input_ids"], enc["attention_mask"], labels, int(tokenizer.pad_token_id), columns)
    rows = [_prompt_response_ids(p, r, tokenizer) for p, r in zip(table["prompt"], table["response"], strict=True)]
    ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    for i, (prompt_ids, response_ids) in enumerate(rows):
        # Keep the response: cut the prompt from the left when the pair is too long.
        response_ids = response_ids[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
        seq = prompt_ids + response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(prompt_ids) : len(seq)] = torch.tensor(response_ids)
    return Encoded(ids, mask, labels, int(tokenizer.pad_token_id))


def _prompt_response_ids(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Instruction format: the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    else:
        prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(str(response), add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(response_ids) + [tokenizer.eos_token_id]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch: tokens, and column features where there are any."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "columns") if k in batch}


def per_sample_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None
) -> torch.Tensor:
    """One loss per record, from the logits (shape: batch)."""
    logits = model(**model_inputs(batch)).logits
    labels = batch["labels"]
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts  # mean over the record's own response tokens


def plan_steps(records: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Poisson sample rate q = B / records and the number of local steps per round (epochs / q).

    `records` is the institution's declared, public record count, never the private one: q and
    the step count are sent to the server and feed the accountant.
    """
    rate = min(1.0, batch_size / records)
    return rate, max(1, round(epochs / rate))


@dataclass
class TrainStats:
    """What a round did; for the institution's local log, never for the server."""

    steps: int
    examples: int  # records processed (sum of Poisson batch sizes)
    rows: int  # rows computed, padding included: a function of public quantities only
    empty_batches: int
    mean_loss: float


def learning_rate(cfg: DictConfig) -> float:
    """train.lr, or (null) the data source's rate for the run's privacy setting (data.lr)."""
    if cfg.train.lr is not None:
        return float(cfg.train.lr)
    return float(cfg.data.lr.private if cfg.privacy.enabled else cfg.data.lr.non_private)


def make_optimizer(params: list[nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=learning_rate(cfg))
    return torch.optim.SGD(params, lr=learning_rate(cfg), momentum=0.9)


def train_local(
    engine: GradientEngine,
    data: Encoded,
    cfg: DictConfig,
    sample_rate: float,
    steps: int,
    class_weights: torch.Tensor | None,
    generator: torch.Generator | None = None,
    slots: int | None = None,
) -> TrainStats:
    """`steps` steps on Poisson batches: each of `slots` public slots joins a batch with
    probability q; slots past the data are padding rows (Encoded.slots). `slots` defaults to
    len(data) (no padding)."""
    model = engine.module
    device = engine.params[0].device
    slots = len(data) if slots is None else slots
    if slots < len(data):
        raise ValueError(f"{len(data)} records in {slots} slots: every record needs a slot")
    model.train()
    # Class weights act per record, scaled into (0, 1]: on the clipped gradient under DP (see
    # PrivateGradientEngine.backward), on the loss without DP.
    record_weights = None if class_weights is None else class_weights / class_weights.max()
    if engine.private:
        probe, _ = data.slots(torch.arange(2), device)  # real or padding rows: shape is what counts
        engine.verify_coverage(per_sample_losses(model, probe, None))
    micro = slots if cfg.train.micro_batch_size is None else int(cfg.train.micro_batch_size)
    return poisson_steps(
        engine,
        cfg,
        slots,
        sample_rate,
        steps,
        generator,
        lambda index: _backward_batch(engine, data, index, micro, record_weights),
    )


def poisson_steps(
    engine: GradientEngine,
    cfg: DictConfig,
    slots: int,
    sample_rate: float,
    steps: int,
    generator: torch.Generator | None,
    backward: Callable[[torch.Tensor], tuple[int, float]],
) -> TrainStats:
    """The DP-SGD step loop of every recipe: each step a Poisson batch over `slots` public
    slots; `backward(index)` accumulates per-record gradients and returns (records, their summed
    loss); the engine clips, noises and normalises once per step (an empty batch is a noise-only
    step). Without a generator the batches come from OS entropy, never from torch's global
    generator (model loading seeds that with a public seed)."""
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    optimizer = make_optimizer(engine.params, cfg)
    stats = TrainStats(steps, 0, 0, 0, 0.0)
    loss_sum = 0.0
    for _ in range(steps):
        index = (torch.rand(slots, generator=generator) < sample_rate).nonzero().squeeze(1)
        optimizer.zero_grad(set_to_none=True)
        records, step_loss = backward(index)
        loss_sum += step_loss
        stats.empty_batches += int(records == 0)
        if engine.finalize(records):
            optimizer.step()
        stats.examples += records
        stats.rows += len(index)
    stats.mean_loss = loss_sum / max(stats.examples, 1)
    return stats


def _backward_batch(
    engine: GradientEngine, data: Encoded, index: torch.Tensor, micro: int, record_weights: torch.Tensor | None
) -> tuple[int, float]:
    """Backward over one logical (Poisson) batch: (records in it, their summed loss).

    A batch larger than fits at once runs in micro-batches; the engine clips per record and adds
    noise once per logical step (in finalize), so nothing else changes.
    """
    device = engine.params[0].device
    records, loss_sum = 0, 0.0
    for chunk in index.split(max(micro, 1)) if len(index) > 0 else ():
        batch, real = data.slots(chunk, device)
        with compute_precision(device):
            losses = per_sample_losses(engine.module, batch, None)
        weights = real.to(device).float()
        if record_weights is not None:
            weights = weights * record_weights[batch["labels"]]
        engine.backward(losses, weights)
        records += int(real.sum())
        loss_sum += float(losses.detach()[real.to(device)].sum())
    return records, loss_sum


def by_length(data: Encoded) -> torch.Tensor:
    """Record indices from shortest to longest, for evaluation batches.

    Each batch is trimmed to its longest record, so batching records of similar length
    spends less of the forward on padding; the order changes no result beyond float rounding.
    """
    return torch.argsort(data.attention_mask.sum(dim=1), stable=True)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int) -> dict[str, float]:
    """Classification: accuracy, balanced accuracy, macro-F1, AUC; causal LM: loss, perplexity."""
    model.eval()
    device = next(p for p in model.parameters()).device
    classification = data.labels.dim() == 1
    outputs, total_loss, total_tokens = [], 0.0, 0
    order = by_length(data)
    for start in range(0, len(data), batch_size):
        batch = data.batch(order[start : start + batch_size], device)
        if classification:
            with compute_precision(device):
                logits = model(**model_inputs(batch)).logits
            outputs.append(torch.softmax(logits.float(), dim=-1).cpu())
        else:
            with compute_precision(device):
                losses = per_sample_losses(model, batch, None)
            tokens = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
            total_loss += float((losses * tokens).sum())
            total_tokens += int(tokens.sum())
    if not classification:
        loss = total_loss / max(total_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    in_order = torch.cat(outputs)
    probs = torch.empty_like(in_order)
    probs[order] = in_order  # back to the records' own order
    return classification_metrics(data.labels.numpy(), probs.numpy())


@torch.no_grad()
def record_losses(model: nn.Module, data: Encoded, batch_size: int) -> np.ndarray:
    """Each record's own loss under the model (the audit's membership signal)."""
    model.eval()
    device = next(p for p in model.parameters()).device
    losses = torch.empty(len(data), dtype=torch.float64)
    order = by_length(data)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        losses[index] = per_sample_losses(model, data.batch(index, device), None).double().cpu()
    return losses.numpy()


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        metrics["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    return metrics


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Metrics of always predicting the training set's majority class."""
    majority = np.bincount(train_labels, minlength=num_classes).argmax()
    probs = np.zeros((len(test_labels), num_classes))
    probs[:, majority] = 1.0
    metrics = classification_metrics(test_labels, probs)
    metrics.pop("auc", None)
    return metrics
