"""Rules across groups: which settings compose. Checks on one group's own fields live beside them."""

from __future__ import annotations

from fed_dp_lora.config.fields import require
from fed_dp_lora.config.root import RunConfig
from fed_dp_lora.config.strategy import ROBUST_STRATEGIES, DpFedAvgConfig


def check_rules(run: RunConfig) -> None:
    """Raise ConfigError for the first combination of groups that cannot run together."""
    require(
        run.data.partitioner != "dirichlet" or run.model.task == "classification",
        "data.partitioner",
        "dirichlet label skew needs labels",
        "use iid or column for causal-lm",
    )
    if run.resume:
        require(
            run.output_dir is not None,
            "resume",
            "needs the stopped run's output-dir",
            "pass -c 'output-dir=\"/abs/path/of/the/run\"' with -c resume=true",
        )
        require(
            not run.secagg,
            "resume",
            "Flower's legacy SecAgg+ workflow always starts at round 1",
            "start a new run (new output-dir) for secagg=true",
        )
    if run.secagg:
        _check_secagg(run)
    if run.train.method == "linear-probe":
        _check_probe(run)


def _check_probe(run: RunConfig) -> None:
    """The linear probe trains a classification head on frozen features: no base-model layer trains."""
    require(
        run.model.task == "classification",
        "train.method",
        "linear-probe trains a classification head",
        "use recipe=lora for model.task=causal-lm",
    )
    require(
        not run.audit.enabled and not run.audit.release.enabled,
        "audit",
        "the audits plant canaries in the LoRA training path",
        "audit with recipe=lora",
    )
    require(
        not run.train.gradient_checkpointing,
        "train.gradient_checkpointing",
        "the linear probe trains no layer of the base model",
        "leave it false with recipe=linear-probe",
    )


def _check_secagg(run: RunConfig) -> None:
    """What SecAgg+ hides from the server rules out every setting that needs an individual update."""
    s, a = run.strategy, run.attack
    require(
        s.name not in ROBUST_STRATEGIES,
        "secagg",
        f"strategy={s.name} cannot run under SecAgg+: a robust aggregator needs every individual "
        "update, and SecAgg+ reveals only their sum",
        f"use strategy=fedavg or strategy=dp-fedavg with secagg=true, or keep strategy={s.name} with secagg=false",
    )
    dp = s if isinstance(s, DpFedAvgConfig) else None
    require(
        dp is None or not dp.adaptive,
        "secagg",
        "adaptive clipping needs each client's clipped/unclipped bit, which would travel unmasked "
        "beside the masked update",
        "use fixed clipping (strategy.adaptive=false) with secagg=true",
    )
    require(
        a.fraction == 0.0 or a.kind not in ("non-finite", "wrong-shape"),
        "attack.kind",
        f"{a.kind} updates cannot be rejected under SecAgg+: the server never sees an individual "
        "update (and a wrong-shape vector aborts the protocol)",
        "simulate sign-flip, gaussian or constant attacks with secagg=true, or test update rejection with secagg=false",
    )
    if dp is not None:
        clip, quantizer = dp.clip_norm, run.secaggplus.clipping_range
        require(
            clip <= quantizer,
            "secaggplus.clipping_range",
            f"{quantizer} is below strategy.clip_norm={clip}: a clipped update's coordinates could be "
            "cut again by the quantizer",
            f"set secaggplus.clipping_range >= {clip}",
        )
    require(
        run.upload.compression == "none",
        "upload.compression",
        "SecAgg+ masks and quantizes the update itself",
        "leave upload.compression=none with secagg=true",
    )
    require(
        not run.audit.release.enabled,
        "audit.release",
        "SecAgg+ hides each client's release from the server",
        "audit with secagg=false",
    )
