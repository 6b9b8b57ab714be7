"""The server's evaluation batches: eval.batch_size=auto and the largest batch that fits."""

from __future__ import annotations

import pytest
import torch

from fed_dp_lora.central import CPU_EVAL_BATCH, GPU_EVAL_START, CentralEvaluator, eval_batch_size, largest_fitting
from fed_dp_lora.training import by_length, classification_metrics


def test_a_number_is_taken_as_is_and_auto_depends_on_the_device():
    assert eval_batch_size(64, torch.device("cpu")) == 64
    assert eval_batch_size(64, torch.device("cuda")) == 64
    assert eval_batch_size("auto", torch.device("cpu")) == CPU_EVAL_BATCH
    assert eval_batch_size("auto", torch.device("cuda")) is None  # probed on the GPU


def test_largest_fitting_halves_on_out_of_memory_until_the_batch_fits():
    # No GPU here: the out-of-memory error is the one CUDA raises ("CUDA out of memory."),
    # raised by hand for batches above what the pretend device holds.
    tried = []

    def run(batch_size: int) -> str:
        tried.append(batch_size)
        if batch_size > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"ran {batch_size}"

    assert largest_fitting(run) == ("ran 256", 256)
    assert tried == [GPU_EVAL_START, GPU_EVAL_START // 2, 256]


def test_largest_fitting_lets_other_errors_through():
    def run(batch_size: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        largest_fitting(run)


def test_the_server_evaluates_with_auto_batches_as_with_any_other(tiny_cfg):
    # Records of several lengths: the tiny BERT's tokenizer spends 70-96 tokens on one.
    cfg = tiny_cfg("data.test_fraction=0.05", "train.max_length=128")
    central = CentralEvaluator(cfg)
    assert central.batch_size == CPU_EVAL_BATCH and len(central.test) > CPU_EVAL_BATCH
    assert not torch.equal(by_length(central.test), torch.arange(len(central.test)))  # batched out of order
    gen = torch.Generator().manual_seed(0)  # an adapter that tells records apart (B and head start at 0)
    state = {name: torch.randn(t.shape, generator=gen) * 0.1 for name, t in central.initial_state().items()}
    got = central.evaluate(state)
    with torch.no_grad():  # every record in one forward, in the records' own order
        logits = central.model.eval()(input_ids=central.test.input_ids, attention_mask=central.test.attention_mask).logits
    probs = torch.softmax(logits, dim=-1).numpy()
    want = classification_metrics(central.test.labels.numpy(), probs)
    assert got["auc"] != pytest.approx(0.5, abs=1e-3)  # not a constant prediction
    assert got == pytest.approx(want, abs=1e-6)
    shuffled = classification_metrics(central.test.labels.numpy(), probs[by_length(central.test).numpy()])
    assert shuffled["auc"] != pytest.approx(got["auc"], abs=1e-3)  # the order matters to the metrics
