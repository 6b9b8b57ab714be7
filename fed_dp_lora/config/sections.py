"""The sections of conf/config.yaml that have no presets to choose from: one dataclass each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting

ATTACKS = ("sign-flip", "gaussian", "constant", "non-finite", "wrong-shape")


@dataclass
class TrainConfig(Group):
    """Local training on each client."""

    KEY: ClassVar[str] = "train"

    method: str = setting(
        "linear-probe",
        "`linear-probe`: a head trained by DP-SGD on frozen features of the "
        "base model, cached per client and never sent; `lora`: PEFT LoRA/FFA "
        "fine-tuning. Select with the recipe group (conf/recipe), which also "
        "sets epochs, lr and privacy.clip_norm",
        choices=("linear-probe", "lora"),
    )
    epochs: float = setting(20.0, "local passes over the client's data per round (Poisson steps = epochs / q)")
    batch_size: int = setting(128, "expected (Poisson) batch size")
    lr: float | None = setting(
        None, "learning rate; null: the data source's data.lr.private under DP, data.lr.non_private without"
    )
    optimizer: str = setting("adam", "local optimizer", choices=("adam", "sgd"))
    max_length: int = setting(
        64, "tokens per record; conf/config.yaml sets it to `${data.max_length}`, the data source's own length"
    )
    device: str = setting("auto", "where training runs", choices=("auto", "cpu", "cuda"))
    micro_batch_size: int | None = setting(
        None,
        "records per forward/backward: a larger Poisson batch "
        "runs in pieces, noise drawn once per logical step (same "
        "accounting); null: the whole batch at once",
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward: less memory, more time")

    def validate(self) -> None:
        super().validate()
        require(self.epochs > 0, self.key("epochs"), "must be > 0", "e.g. 1")
        require(self.batch_size >= 1, self.key("batch_size"), "must be >= 1", "e.g. 64")
        require(
            self.lr is None or self.lr > 0,
            self.key("lr"),
            "must be > 0",
            "e.g. 0.003, or null for the data source's data.lr",
        )
        require(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            self.key("micro_batch_size"),
            "must be >= 1",
            "e.g. train.micro_batch_size=16, or null for whole batches",
        )
        require(self.max_length >= 8, self.key("max_length"), "must be >= 8", "e.g. 64")


@dataclass
class ProbeConfig(Group):
    """The linear probe's feature centring (train.method=linear-probe)."""

    KEY: ClassVar[str] = "probe"

    center: bool = setting(
        True,
        "train on features minus the client's own feature mean (a DP release of it "
        "under DP, accounted in the ledger; never sent)",
    )
    center_clip: float = setting(4.5, "L2 bound of each record's feature vector in that mean")
    center_noise_multiplier: float = setting(10.0, "Gaussian noise std on the clipped sum, in units of center_clip")

    def validate(self) -> None:
        super().validate()
        require(
            isinstance(self.center, bool), self.key("center"), f"{self.center!r} is not a boolean", "use true or false"
        )
        require(self.center_clip > 0, self.key("center_clip"), "must be > 0", "e.g. 4.5")
        require(self.center_noise_multiplier > 0, self.key("center_noise_multiplier"), "must be > 0", "e.g. 10")


@dataclass
class EvalConfig(Group):
    """Central evaluation on the server's held-out set."""

    KEY: ClassVar[str] = "eval"

    batch_size: int | str = setting(
        "auto",
        "records per evaluation batch; `auto`: the fastest on a CPU "
        "(see scripts/bench_eval.py), the largest that fits on a GPU "
        "(probed once)",
        takes="auto or a whole number",
    )
    interval: int = setting(1, "central evaluation every N rounds (and always after the last)")

    def validate(self) -> None:
        super().validate()
        size = self.batch_size
        whole = isinstance(size, int) and not isinstance(size, bool) and size >= 1
        require(
            size == "auto" or whole,
            self.key("batch_size"),
            f"{size!r} is neither auto nor a whole number >= 1",
            "use auto (the fastest on a CPU, the largest that fits on a GPU) or e.g. 64",
        )
        require(self.interval >= 1, self.key("interval"), "must be >= 1", "e.g. 1 (every round)")


@dataclass
class UploadConfig(Group):
    """What a client's reply carries on the wire."""

    KEY: ClassVar[str] = "upload"

    compression: str = setting(
        "none",
        "`int8`: the update quantized to 8 bits per element (one scale per "
        "tensor) after the DP noise: post-processing, so privacy is unchanged",
        choices=("none", "int8"),
    )


@dataclass
class SecAggPlusConfig(Group):
    """Flower SecAgg+ protocol settings, used when `secagg=true`."""

    KEY: ClassVar[str] = "secaggplus"

    num_shares: int | float = setting(1.0, "float: fraction of the sampled clients each key is shared with; int: count")
    reconstruction_threshold: int | float = setting(
        0.5,
        "float: fraction of shares needed to unmask; "
        "int: count. Lower tolerates more dropouts, "
        "higher resists more colluders",
    )
    clipping_range: float = setting(8.0, "every transmitted update coordinate is clipped to +-this, then quantized")
    max_weight: float = setting(10000.0, "fedavg: a client's weight is num-examples / max_weight (keep >= records)")
    timeout: float | None = setting(None, "seconds to wait for each stage's replies; null: wait for all")

    def validate(self) -> None:
        super().validate()
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            ok = 0 < value <= 1 if isinstance(value, float) else value >= 2
            require(
                ok,
                self.key(name),
                f"{value!r} is neither a fraction in (0, 1] nor a count >= 2",
                "e.g. 1.0 and 0.5 (fractions) or 3 and 2 (counts)",
            )
        require(self.clipping_range > 0, self.key("clipping_range"), "must be > 0", "e.g. 8.0")
        require(self.max_weight > 0, self.key("max_weight"), "must be > 0", "e.g. 10000")


@dataclass
class AttackConfig(Group):
    """Simulated malicious clients (simulation only: needs partition-id)."""

    KEY: ClassVar[str] = "attack"

    fraction: float = setting(0.0, "the first round(fraction * num-partitions) partitions are malicious")
    kind: str = setting(
        "sign-flip",
        "`sign-flip`: -scale * update; `gaussian`: noise of std scale; "
        "`constant`: scale added; `non-finite` and `wrong-shape`: updates the "
        "server must reject",
        choices=ATTACKS,
    )
    scale: float = setting(10.0, "strength of the attack (see kind)")

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.fraction < 1.0, self.key("fraction"), f"{self.fraction} is not in [0, 1)", "e.g. 0.25")
        require(self.scale > 0, self.key("scale"), "must be > 0", "e.g. 10")


@dataclass
class TrackingConfig(Group):
    """Where a run's metrics go besides summary.json."""

    KEY: ClassVar[str] = "tracking"

    backend: str = setting(
        "none", "`tensorboard`: event files under <output-dir>/tensorboard", choices=("none", "tensorboard")
    )
