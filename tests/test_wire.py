"""What travels: 8-bit uploads (post-processing after DP noise) and their checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fed_dp_lora.config import to_plain
from fed_dp_lora.experiments.inprocess import InProcessGrid
from fed_dp_lora.report import RunReport
from fed_dp_lora.strategies import build_strategy
from fed_dp_lora.wire import (INT8_UPDATE, SCALE_SUFFIX, UPLOAD_KEY, decode_int8_update, encode_int8_update,
                              payload_bytes)
from tests.strategies.helpers import run_strategy

GLOBAL = {"a": torch.randn(16, 384), "b": torch.zeros(384, 16), "head": torch.randn(2, 384)}


def local_state(shift: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: v + shift * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}


def test_int8_update_round_trips_within_half_a_step_and_is_four_times_smaller():
    local = {**local_state(), "b": GLOBAL["b"].clone()}  # an unchanged tensor: scale 1, all zeros
    encoded = encode_int8_update(GLOBAL, local)
    decoded = decode_int8_update(encoded, ArrayRecord(GLOBAL)).to_torch_state_dict()
    for key in GLOBAL:
        scale = float(encoded[key + SCALE_SUFFIX].numpy()[0])
        assert encoded[key].numpy().dtype == np.int8
        assert float((decoded[key] - local[key]).abs().max()) <= scale / 2 + 1e-6, key
    assert torch.equal(decoded["b"], GLOBAL["b"])
    assert payload_bytes(encoded) < 0.3 * payload_bytes(ArrayRecord(local))


@pytest.mark.parametrize("damage, problem", [
    (lambda r: {k: v for k, v in r.items() if not k.endswith(SCALE_SUFFIX)}, "wrong tensors"),
    (lambda r: {**r, "a": r["a"].float()}, "not int8"),
    (lambda r: {**r, "a" + SCALE_SUFFIX: torch.tensor([float("nan")])}, "finite scale"),
    (lambda r: {**r, "a": r["a"][:3]}, "shape"),
])
def test_a_malformed_int8_upload_is_named(damage, problem):
    encoded = encode_int8_update(GLOBAL, local_state()).to_torch_state_dict()
    assert problem in decode_int8_update(ArrayRecord(damage(encoded)), ArrayRecord(GLOBAL))


@pytest.mark.usefixtures("task_identity")
def test_the_server_aggregates_int8_uploads_and_counts_the_bytes_sent(tmp_path, make_cfg):
    cfg = make_cfg("strategy.min_available_clients=1", "strategy.min_train_clients=1")
    report = RunReport(tmp_path, to_plain(cfg))
    local = local_state()
    bad = {k: v.float() for k, v in encode_int8_update(GLOBAL, local).to_torch_state_dict().items()}

    def client(arrays: ArrayRecord):
        return lambda msg: Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": 10, "train-loss": 0.5}), UPLOAD_KEY: ConfigRecord({"encoding": INT8_UPDATE})}),
            reply_to=msg)

    good = encode_int8_update(GLOBAL, local)
    grid = InProcessGrid({1: client(good), 2: client(ArrayRecord(bad))})
    result = run_strategy(build_strategy(cfg), grid, GLOBAL, report).arrays.to_torch_state_dict()
    for key in GLOBAL:
        torch.testing.assert_close(result[key], local[key], atol=float(good[key + SCALE_SUFFIX].numpy()[0]), rtol=0)
    entry = report.rounds[0]
    assert entry["bytes"]["up"] == payload_bytes(good)
    assert set(entry["clients"]) == {"node-1"} and "not int8" in entry["failures"]["node-2"]


def test_a_secagg_update_stays_within_the_clip_norm_after_stochastic_rounding():
    """DP-FedAvg under SecAgg+: clipped to C minus the rounding margin, quantized as SecAgg+ does,
    the update's norm is still at most C (the sensitivity the server's noise assumes)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.compat.common import recorddict_compat as compat

    from fed_dp_lora.wire import (SECAGG_CLIP, SECAGG_KEYS, SECAGG_QUANTIZATION_RANGE, secagg_fitres,
                                  secagg_quantization_margin)

    clip, clipping_range = 1.0, 8.0
    local = local_state(shift=1.0)  # far above the clip norm: clipping binds
    config = {SECAGG_KEYS: "\n".join(GLOBAL), SECAGG_CLIP: clip}
    margin = secagg_quantization_margin(local, clipping_range)
    fitres = compat.recorddict_to_fitres(secagg_fitres(GLOBAL, local, config, 10, {}, quantization_margin=margin),
                                         keep_input=True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert np.sqrt(sum(np.sum(u.astype(np.float64) ** 2) for u in update)) <= clip - margin + 1e-6
    worst = 0.0
    for seed in range(20):
        np.random.seed(seed)  # Flower's stochastic rounding draws from numpy's global generator
        rounded = dequantize(quantize(update, clipping_range, SECAGG_QUANTIZATION_RANGE), clipping_range,
                             SECAGG_QUANTIZATION_RANGE)
        worst = max(worst, float(np.sqrt(sum(np.sum(r.astype(np.float64) ** 2) for r in rounded))))
    assert worst <= clip
    assert margin > 0 and worst > clip - margin  # the rounding did move the norm, within the margin
