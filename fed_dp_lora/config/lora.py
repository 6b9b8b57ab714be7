"""The `lora` group: the adapter every client trains and the server aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fed_dp_lora.config.fields import Group, require, setting


@dataclass
class AdapterConfig(Group):
    """PEFT LoRA settings (named apart from `peft.LoraConfig`, which models.py builds from it)."""

    KEY: ClassVar[str] = "lora"

    mode: str = setting(
        "vanilla",
        "`vanilla`: A and B trained; `ffa`: A frozen at `lora.init_seed`, shared by "
        "all clients, only B trains and travels, so averaging is exact",
        choices=("vanilla", "ffa"),
    )
    r: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = setting(0.0, "dropout on the LoRA input, in [0, 1)")
    target_modules: Any = setting(
        None, "modules LoRA adapts; null: `model.lora_targets`", takes="a list of module names or one regex"
    )
    init_seed: int = setting(0, "seed of the LoRA initialisation, shared by all clients and the server")

    def validate(self) -> None:
        super().validate()
        require(self.r >= 1, self.key("r"), f"rank {self.r} < 1", "use a rank of 1 or more")
        require(self.alpha > 0, self.key("alpha"), "must be > 0", "e.g. lora.alpha=16")
        require(0.0 <= self.dropout < 1.0, self.key("dropout"), "must be in [0, 1)", "e.g. 0.05")
        targets = self.target_modules
        names = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
        require(
            targets is None or isinstance(targets, str) or names,
            self.key("target_modules"),
            f"{targets!r} is neither a list of module names nor one regex",
            "e.g. [query,value]",
        )
        require(
            targets is None or len(targets) > 0,
            self.key("target_modules"),
            "is empty",
            "name the modules to adapt, e.g. [query,value] (BERT) or [q_proj,v_proj] (Llama)",
        )
