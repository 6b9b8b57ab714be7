"""What travels: adapter tensors as ArrayRecords, their byte counts, and update checks."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fed_dp_lora.flower_internals import recorddict_compat as compat
from fed_dp_lora.privacy.user_level import clip_update


def scalar(value: object) -> float:
    """A numeric metric or config value (Flower's record values may also be lists or text)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the serialized tensors in one ArrayRecord."""
    return sum(len(a.data) for a in arrays.values())


def update_problem(arrays: ArrayRecord, reference: ArrayRecord, max_norm: float = 1e6) -> str | None:
    """Why a client's adapter cannot be aggregated (None if it can).

    Checked before any aggregation, for every strategy: same keys and shapes as the global
    adapter, finite values, and a change from the global adapter of sane size.
    """
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(reference.keys()))[:3]
        return f"wrong tensors (missing {missing}, unexpected {extra})"
    sq = 0.0
    for key, ref in reference.items():
        new, old = arrays[key].numpy(), ref.numpy()
        if new.shape != old.shape:
            return f"{key}: shape {new.shape} != {old.shape}"
        if not np.all(np.isfinite(new)):
            return f"{key}: NaN or Inf values"
        sq += float(np.sum((new.astype(np.float64) - old) ** 2))
    if np.sqrt(sq) > max_norm:
        return f"update norm {np.sqrt(sq):.3g} exceeds {max_norm:g}"
    return None


# --- 8-bit uploads ---------------------------------------------------------------------------

UPLOAD_KEY = "upload"  # ConfigRecord in a reply: how its "arrays" are encoded
INT8_UPDATE = "int8-update"  # the update (local - global), int8 per element + a scale per tensor
SCALE_SUFFIX = "|scale"


def encode_int8_update(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor]) -> ArrayRecord:
    """local - global, each tensor quantized symmetrically to int8 with its own float32 scale.

    Applied to what DP-SGD already released, so it is post-processing: the privacy guarantee
    is untouched. Round-to-nearest: at most scale / 2 = max|u| / 254 error per element.
    """
    out: dict[str, torch.Tensor] = {}
    for key, local in local_state.items():
        update = local.detach().float().cpu() - global_state[key].float().cpu()
        peak = float(update.abs().max()) if update.numel() else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        out[key] = torch.round(update / scale).clamp(-127, 127).to(torch.int8)
        out[key + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return ArrayRecord(out)


def decode_int8_update(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord | str:
    """The adapter the client sent (reference + dequantized update), or why it cannot be read."""
    expected = set(reference.keys()) | {k + SCALE_SUFFIX for k in reference}
    if set(arrays.keys()) != expected:
        return "int8 upload: wrong tensors"
    decoded = {}
    for key, ref in reference.items():
        q, scale = arrays[key].numpy(), arrays[key + SCALE_SUFFIX].numpy()
        if q.dtype != np.int8 or scale.shape != (1,) or not np.isfinite(scale).all():
            return f"int8 upload: {key} is not int8 with one finite scale"
        if q.shape != ref.numpy().shape:
            return f"{key}: shape {q.shape} != {ref.numpy().shape}"
        decoded[key] = torch.from_numpy(ref.numpy() + q.astype(np.float32) * scale[0])
    return ArrayRecord(decoded)


# --- SecAgg+ (legacy fitins/fitres layout, what secaggplus_mod reads and writes) ----------

SECAGG_KEYS = "secagg-keys"  # tensor names, newline-separated: legacy Parameters are a list
SECAGG_CLIP = "secagg-clip-norm"  # DP-FedAvg: clip the update to this before masking
SECAGG_EQUAL = "secagg-equal-weights"  # DP-FedAvg: every update weighs 1, not num-examples


def is_legacy_fitins(content: RecordDict) -> bool:
    return "fitins.parameters" in content.array_records


def secagg_fitins(
    content: RecordDict,
) -> tuple[dict[str, torch.Tensor], dict[str, Scalar]]:
    """The global adapter (named again) and the config of a legacy FitIns."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = str(fitins.config[SECAGG_KEYS]).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"SecAgg+ instructions carry {len(arrays)} tensors for {len(keys)} names")
    return {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}, dict(fitins.config)


# Flower's SecAggPlusWorkflow default: each coordinate is stochastically rounded to one of this
# many levels over [-clipping_range, clipping_range] (we never change it).
SECAGG_QUANTIZATION_RANGE = 4194304


def secagg_quantization_margin(state: dict[str, torch.Tensor], clipping_range: float) -> float:
    """The most stochastic rounding can add to an update's L2 norm: one level per coordinate."""
    elements = sum(t.numel() for t in state.values())
    return float(np.sqrt(elements)) * 2.0 * clipping_range / SECAGG_QUANTIZATION_RANGE


def secagg_fitres(
    global_state: dict[str, torch.Tensor],
    local_state: dict[str, torch.Tensor],
    config: dict[str, Scalar],
    num_examples: int,
    metrics: dict[str, float],
    clip: bool = True,
    quantization_margin: float = 0.0,
) -> RecordDict:
    """A legacy FitRes carrying the update (local - global), clipped if DP-FedAvg asks for it.

    The update, not the adapter, is masked: it is small, so it fits SecAgg+'s clipping range
    with fine quantization, and the server adds it back to the global adapter it holds. Under
    DP-FedAvg it is clipped to C minus `quantization_margin`, so that after SecAgg+'s stochastic
    rounding its norm is still at most C (the sensitivity the server's noise is calibrated for).
    `num_examples` is the institution's declared (public) record count and `metrics` went
    through the reply allowlist: SecAgg+ masks the update, not these, so they must be public.
    """
    keys = str(config[SECAGG_KEYS]).split("\n")
    update = {k: local_state[k].double().numpy() - global_state[k].double().numpy() for k in keys}
    if SECAGG_CLIP in config and clip:
        update, _ = clip_update(update, float(config[SECAGG_CLIP]) - quantization_margin)
    weight = 1 if config.get(SECAGG_EQUAL, False) else int(num_examples)
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([update[k].astype(np.float32) for k in keys]),
        num_examples=weight,
        metrics=dict(metrics),
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)
