"""Compose the Hydra configuration from a Flower run config and validate it in one place.

Both apps call :func:`load_config` with the same run config, so client and server always see
the same resolved configuration. Every check that can be made before data is read lives in
:func:`validate`; checks that need the client's data (delta against 1/n, columns, partition
count) live in :func:`validate_against_data` and run before any training.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PACKAGED_MODELS = ("minilm", "smollm2")


class ConfigError(ValueError):
    """A configuration problem, with the key at fault and how to fix it."""


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (the compose API, never @hydra.main)."""
    try:
        # `with` makes this re-entrant: a reused Ray actor composes again without
        # "GlobalHydra is already initialized".
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"invalid override in {overrides}: {err}. Overrides look like "
            "'privacy.epsilon=1 lora.r=16' or 'privacy=none'; groups are listed in conf/."
        ) from err
    return cfg


def load_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Build the validated configuration from Flower's run config (`overrides`, `output-dir`)."""
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    cfg = compose_config(overrides)
    cfg.output_dir = str(run_config.get("output-dir", "") or "") or None
    resume = run_config.get("resume", False)
    if isinstance(resume, str):  # `-c resume=true` arrives as a bool; a quoted value as text
        resume = {"true": True, "false": False}.get(resume.strip().lower(), resume)
    _require(isinstance(resume, bool), "resume", f"{resume!r} is not true or false",
             "pass -c resume=true to continue a stopped run, or leave it out")
    cfg.resume = resume
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _require(
        value in allowed,
        key,
        f"unknown value {value!r}",
        f"use one of {', '.join(map(str, allowed))}",
    )


# Numeric keys (None: may be null). Checked first, so `lora.r=abc` is a ConfigError naming the
# key instead of a bare ValueError from int(), and `lora.r=2.5` is not silently truncated.
_INTEGERS = {"seed": False, "rounds": False, "model.keep_layers": True, "lora.r": False,
             "lora.init_seed": False, "train.batch_size": False, "train.max_length": False,
             "train.micro_batch_size": True, "eval.interval": False,
             "audit.canaries": False, "audit.seed": False, "audit.release.client": False,
             "audit.release.canaries": False, "audit.release.guesses": False}
_FLOATS = {"lora.alpha": False, "lora.dropout": False, "data.test_fraction": False,
           "data.dirichlet_alpha": False, "privacy.epsilon": True, "privacy.delta": True,
           "privacy.noise_multiplier": True, "privacy.clip_norm": False, "train.epochs": False,
           "train.lr": True, "data.lr.private": False, "data.lr.non_private": False,
           "probe.center_clip": False, "probe.center_noise_multiplier": False, "strategy.fraction_train": False, "audit.guess_fraction": False,
           "audit.confidence": False, "attack.fraction": False,
           "attack.scale": False, "secaggplus.clipping_range": False, "secaggplus.max_weight": False,
           "secaggplus.timeout": True, "strategy.round_timeout": False}
# Strategy keys that exist only in some strategy files: checked when present.
_STRATEGY_INTEGERS = {"strategy.num_malicious": False, "strategy.num_selected": True}
_STRATEGY_FLOATS = {"strategy.beta": False, "strategy.sample_rate": True, "strategy.clip_norm": False,
                    "strategy.noise_multiplier": True, "strategy.epsilon": True, "strategy.delta": True,
                    "strategy.target_quantile": False, "strategy.clip_lr": False,
                    "strategy.clipped_count_stddev": True, "secaggplus.num_shares": False,
                    "secaggplus.reconstruction_threshold": False}

STRATEGIES = ("fedavg", "dp-fedavg", "krum", "multi-krum", "trimmed-mean", "median")
# Aggregators that need every individual update: they cannot run under SecAgg+.
ROBUST_STRATEGIES = ("krum", "multi-krum", "trimmed-mean", "median")
ATTACKS = ("sign-flip", "gaussian", "constant", "non-finite", "wrong-shape")


def _check_numbers(cfg: DictConfig) -> None:
    optional = {**_STRATEGY_INTEGERS, **_STRATEGY_FLOATS}
    for kinds, integer in ((_INTEGERS, True), (_FLOATS, False), (_STRATEGY_INTEGERS, True),
                           (_STRATEGY_FLOATS, False)):
        for key, nullable in kinds.items():
            if key in optional and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
                continue
            value = OmegaConf.select(cfg, key)
            if value is None and nullable:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            _require(
                number and (not integer or float(value).is_integer()),
                key,
                f"{value!r} is not {'an integer' if integer else 'a number'}",
                f"set {key} to {'a whole number' if integer else 'a number'}"
                + (" or null" if nullable else ""),
            )


def validate(cfg: DictConfig) -> None:
    """Check every key that does not need the data; raise ConfigError naming key and fix."""
    _check_numbers(cfg)
    _validate_outputs(cfg)
    _choice(cfg, "model.task", ("classification", "causal-lm"))
    _require(
        str(cfg.model.quantization) in ("none", "4", "8"),
        "model.quantization",
        f"unknown value {cfg.model.quantization!r}",
        "use none, 8 or 4",
    )
    _require(
        cfg.model.keep_layers is None or int(cfg.model.keep_layers) >= 1,
        "model.keep_layers",
        "must be at least 1",
        "set a positive layer count or null",
    )
    _choice(cfg, "model.pooling", ("model", "cls", "mean"))
    _choice(cfg, "lora.mode", ("vanilla", "ffa"))
    _require(int(cfg.lora.r) >= 1, "lora.r", f"rank {cfg.lora.r} < 1", "use a rank of 1 or more")
    _require(float(cfg.lora.alpha) > 0, "lora.alpha", "must be > 0", "e.g. lora.alpha=16")
    _require(
        0.0 <= float(cfg.lora.dropout) < 1.0, "lora.dropout", "must be in [0, 1)", "e.g. 0.05"
    )
    targets = cfg.lora.target_modules if cfg.lora.target_modules is not None else cfg.model.lora_targets
    _require(
        targets is not None and len(targets) > 0,
        "lora.target_modules",
        "is empty",
        "name the modules to adapt, e.g. [query,value] (BERT) or [q_proj,v_proj] (Llama)",
    )
    _choice(cfg, "data.source", ("credit", "reviews", "file", "hub"))
    if cfg.data.source == "hub":
        _require(cfg.data.name is not None, "data.name", "is missing", "set data.name=<hub id>")
    _require(
        0.0 < float(cfg.data.test_fraction) < 1.0,
        "data.test_fraction",
        "must be in (0, 1)",
        "e.g. data.test_fraction=0.2",
    )
    _choice(cfg, "data.partitioner", ("iid", "dirichlet", "column"))
    if cfg.data.partitioner == "dirichlet":
        _require(
            float(cfg.data.dirichlet_alpha) > 0,
            "data.dirichlet_alpha",
            "must be > 0",
            "e.g. 0.5 (smaller is more skewed)",
        )
        _require(
            cfg.model.task == "classification",
            "data.partitioner",
            "dirichlet label skew needs labels",
            "use iid or column for causal-lm",
        )
    if cfg.data.partitioner == "column":
        _require(
            cfg.data.partition_column is not None,
            "data.partition_column",
            "is missing for partitioner=column",
            "name the column that identifies institutions",
        )
    p = cfg.privacy
    _choice(cfg, "privacy.accountant", ("rdp", "prv"))
    if p.enabled:
        _require(
            p.epsilon is not None or p.noise_multiplier is not None,
            "privacy.epsilon",
            "neither a budget nor a noise multiplier is set",
            "set privacy.epsilon=8 (or privacy.noise_multiplier and a budget)",
        )
        if p.epsilon is not None:
            _require(
                float(p.epsilon) > 0,
                "privacy.epsilon",
                f"{p.epsilon} <= 0",
                "use a positive budget, e.g. privacy.epsilon=8",
            )
        if p.noise_multiplier is not None:
            _require(
                float(p.noise_multiplier) > 0,
                "privacy.noise_multiplier",
                "must be > 0",
                "set a positive value or null to calibrate from privacy.epsilon",
            )
        if p.delta is not None:
            _require(
                0.0 < float(p.delta) < 1.0,
                "privacy.delta",
                f"{p.delta} is not in (0, 1)",
                "use null (1/(10 n)) or a value below 1/n",
            )
        _require(float(p.clip_norm) > 0, "privacy.clip_norm", "must be > 0", "e.g. 1.0")
    _require(isinstance(p.seeded_noise, bool), "privacy.seeded_noise", f"{p.seeded_noise!r} is not a boolean",
             "use true or false")
    _require(int(cfg.rounds) >= 1, "rounds", "must be at least 1", "e.g. rounds=4")
    _require(float(cfg.train.epochs) > 0, "train.epochs", "must be > 0", "e.g. 1")
    _require(int(cfg.train.batch_size) >= 1, "train.batch_size", "must be >= 1", "e.g. 64")
    _require(cfg.train.lr is None or float(cfg.train.lr) > 0, "train.lr", "must be > 0",
             "e.g. 0.003, or null for the data source's data.lr")
    for key in ("private", "non_private"):
        _require(float(cfg.data.lr[key]) > 0, f"data.lr.{key}", "must be > 0", "e.g. 0.03")
    _validate_method(cfg)
    _choice(cfg, "train.optimizer", ("adam", "sgd"))
    _choice(cfg, "train.device", ("auto", "cpu", "cuda"))
    _require(cfg.train.micro_batch_size is None or int(cfg.train.micro_batch_size) >= 1, "train.micro_batch_size",
             "must be >= 1", "e.g. train.micro_batch_size=16, or null for whole batches")
    _require(isinstance(cfg.train.gradient_checkpointing, bool), "train.gradient_checkpointing",
             f"{cfg.train.gradient_checkpointing!r} is not a boolean", "use true or false")
    _require(int(cfg.train.max_length) >= 8, "train.max_length", "must be >= 8", "e.g. 64")
    size = cfg.eval.batch_size
    _require(size == "auto" or isinstance(size, int) and not isinstance(size, bool) and size >= 1,
             "eval.batch_size", f"{size!r} is neither auto nor a whole number >= 1",
             "use auto (the fastest on a CPU, the largest that fits on a GPU) or e.g. 64")
    _require(int(cfg.eval.interval) >= 1, "eval.interval", "must be >= 1", "e.g. 1 (every round)")
    _validate_strategy(cfg)
    _choice(cfg, "upload.compression", ("none", "int8"))
    _require(not (cfg.secagg and cfg.upload.compression != "none"), "upload.compression",
             "SecAgg+ masks and quantizes the update itself", "leave upload.compression=none with secagg=true")
    if cfg.resume:
        _require(cfg.output_dir is not None, "resume", "needs the stopped run's output-dir",
                 "pass -c 'output-dir=\"/abs/path/of/the/run\"' with -c resume=true")
        _require(not cfg.secagg, "resume", "Flower's legacy SecAgg+ workflow always starts at round 1",
                 "start a new run (new output-dir) for secagg=true")
    if cfg.output_dir is not None:
        _require(
            Path(cfg.output_dir).is_absolute(),
            "output-dir",
            f"{cfg.output_dir!r} is not an absolute path",
            "pass an absolute path: -c 'output-dir=\"/abs/path\"'",
        )


def _validate_method(cfg: DictConfig) -> None:
    """train.method and the linear probe's settings (probe.*)."""
    _choice(cfg, "train.method", ("linear-probe", "lora"))
    if cfg.train.method != "linear-probe":
        return
    _require(cfg.model.task == "classification", "train.method",
             "linear-probe trains a classification head", "use recipe=lora for model.task=causal-lm")
    _require(not cfg.audit.enabled and not cfg.audit.release.enabled, "audit",
             "the audits plant canaries in the LoRA training path", "audit with recipe=lora")
    _require(not cfg.train.gradient_checkpointing, "train.gradient_checkpointing",
             "the linear probe trains no layer of the base model", "leave it false with recipe=linear-probe")
    pr = cfg.probe
    _require(isinstance(pr.center, bool), "probe.center", f"{pr.center!r} is not a boolean", "use true or false")
    _require(float(pr.center_clip) > 0, "probe.center_clip", "must be > 0", "e.g. 4.5")
    _require(float(pr.center_noise_multiplier) > 0, "probe.center_noise_multiplier", "must be > 0", "e.g. 10")


def _validate_outputs(cfg: DictConfig) -> None:
    """The audit and the tracker: what a run measures and writes besides the adapter."""
    a = cfg.audit
    _require(int(a.canaries) >= 2, "audit.canaries", "must be at least 2", "e.g. audit.canaries=500")
    _require(
        0.0 < float(a.guess_fraction) <= 1.0 and int(int(a.canaries) * float(a.guess_fraction)) >= 2,
        "audit.guess_fraction",
        f"{a.guess_fraction} of {a.canaries} canaries leaves fewer than 2 guesses",
        "use a fraction in (0, 1] with canaries * fraction >= 2, e.g. 0.2",
    )
    _require(
        0.5 <= float(a.confidence) < 1.0,
        "audit.confidence",
        f"{a.confidence} is not in [0.5, 1)",
        "e.g. audit.confidence=0.95",
    )
    r = a.release
    _require(isinstance(r.enabled, bool), "audit.release.enabled", f"{r.enabled!r} is not a boolean",
             "use true or false")
    _require(int(r.client) >= 0, "audit.release.client", "must be a partition id >= 0", "e.g. 0")
    _require(2 <= int(r.guesses) <= int(r.canaries) and int(r.guesses) % 2 == 0, "audit.release.guesses",
             f"{r.guesses} is not an even number in [2, audit.release.canaries={r.canaries}]",
             "e.g. audit.release.guesses=200 with 1000 canaries")
    if r.enabled:
        _require(not cfg.secagg, "audit.release", "SecAgg+ hides each client's release from the server",
                 "audit with secagg=false")
    _choice(cfg, "tracking.backend", ("none", "tensorboard"))


def _validate_strategy(cfg: DictConfig) -> None:
    """The strategy, its options, SecAgg+ and the attack, and which of them compose."""
    s = cfg.strategy
    _choice(cfg, "strategy.name", STRATEGIES)
    _require(0.0 < float(s.fraction_train) <= 1.0, "strategy.fraction_train", "must be in (0, 1]", "e.g. 1.0")
    _require(int(s.min_train_clients) >= 1, "strategy.min_train_clients", "must be >= 1", "e.g. 2")
    _require(float(s.round_timeout) > 0, "strategy.round_timeout", "must be > 0 seconds", "e.g. 3600")
    if s.name in ("krum", "multi-krum"):
        _require(int(s.num_malicious) >= 0, "strategy.num_malicious", "must be >= 0", "e.g. 1")
    if s.name == "multi-krum" and s.num_selected is not None:
        _require(int(s.num_selected) >= 1, "strategy.num_selected", "must be >= 1", "e.g. 2, or null for n - f")
    if s.name == "trimmed-mean":
        _require(0.0 <= float(s.beta) < 0.5, "strategy.beta", f"{s.beta} is not in [0, 0.5)", "e.g. 0.25")
    if s.name == "dp-fedavg":
        _choice(cfg, "strategy.sampling", ("fraction", "poisson"))
        if s.sampling == "poisson":
            _require(
                s.sample_rate is not None and 0.0 < float(s.sample_rate) <= 1.0,
                "strategy.sample_rate",
                f"{s.sample_rate} is not in (0, 1] for sampling=poisson",
                "e.g. strategy.sample_rate=0.5",
            )
        _require(float(s.clip_norm) > 0, "strategy.clip_norm", "must be > 0", "e.g. 1.0")
        _require(
            s.noise_multiplier is not None or s.epsilon is not None,
            "strategy.noise_multiplier",
            "neither a noise multiplier nor a user-level budget is set",
            "set strategy.noise_multiplier=1.0 or strategy.epsilon=8",
        )
        if s.noise_multiplier is not None:
            _require(float(s.noise_multiplier) > 0, "strategy.noise_multiplier", "must be > 0",
                     "set a positive value or null to calibrate from strategy.epsilon")
        if s.epsilon is not None:
            _require(float(s.epsilon) > 0, "strategy.epsilon", "must be > 0", "e.g. 8")
        if s.delta is not None:
            _require(0.0 < float(s.delta) < 1.0, "strategy.delta", f"{s.delta} is not in (0, 1)",
                     "use null (1/(10 N)) or a value below 1/N for N clients")
        if s.adaptive:
            _require(0.0 <= float(s.target_quantile) <= 1.0, "strategy.target_quantile",
                     "must be in [0, 1]", "e.g. 0.5")
            _require(float(s.clip_lr) > 0, "strategy.clip_lr", "must be > 0", "e.g. 0.2")
            if s.clipped_count_stddev is not None:
                _require(float(s.clipped_count_stddev) > 0, "strategy.clipped_count_stddev",
                         "must be > 0", "e.g. 1.0, or null for expected clients / 20")
    a = cfg.attack
    _choice(cfg, "attack.kind", ATTACKS)
    _require(0.0 <= float(a.fraction) < 1.0, "attack.fraction", f"{a.fraction} is not in [0, 1)", "e.g. 0.25")
    _require(float(a.scale) > 0, "attack.scale", "must be > 0", "e.g. 10")
    _require(isinstance(cfg.secagg, bool), "secagg", f"{cfg.secagg!r} is not true or false", "secagg=true")
    if not cfg.secagg:
        return
    _require(
        s.name not in ROBUST_STRATEGIES,
        "secagg",
        f"strategy={s.name} cannot run under SecAgg+: a robust aggregator needs every individual "
        "update, and SecAgg+ reveals only their sum",
        "use strategy=fedavg or strategy=dp-fedavg with secagg=true, or keep "
        f"strategy={s.name} with secagg=false",
    )
    _require(
        not (s.name == "dp-fedavg" and s.adaptive),
        "secagg",
        "adaptive clipping needs each client's clipped/unclipped bit, which would travel unmasked "
        "beside the masked update",
        "use fixed clipping (strategy.adaptive=false) with secagg=true",
    )
    _require(
        float(a.fraction) == 0.0 or a.kind not in ("non-finite", "wrong-shape"),
        "attack.kind",
        f"{a.kind} updates cannot be rejected under SecAgg+: the server never sees an individual "
        "update (and a wrong-shape vector aborts the protocol)",
        "simulate sign-flip, gaussian or constant attacks with secagg=true, or test update "
        "rejection with secagg=false",
    )
    sp = cfg.secaggplus
    for key in ("num_shares", "reconstruction_threshold"):
        value = sp[key]
        ok = 0 < float(value) <= 1 if isinstance(value, float) else int(value) >= 2
        _require(ok, f"secaggplus.{key}", f"{value!r} is neither a fraction in (0, 1] nor a count >= 2",
                 "e.g. 1.0 and 0.5 (fractions) or 3 and 2 (counts)")
    _require(float(sp.clipping_range) > 0, "secaggplus.clipping_range", "must be > 0", "e.g. 8.0")
    _require(float(sp.max_weight) > 0, "secaggplus.max_weight", "must be > 0", "e.g. 10000")
    if s.name == "dp-fedavg":
        _require(
            float(s.clip_norm) <= float(sp.clipping_range),
            "secaggplus.clipping_range",
            f"{sp.clipping_range} is below strategy.clip_norm={s.clip_norm}: a clipped update's "
            "coordinates could be cut again by the quantizer",
            f"set secaggplus.clipping_range >= {s.clip_norm}",
        )


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain Python (for summary.json)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
