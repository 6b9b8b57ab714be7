"""The `model` group: which base model, how it is loaded, and where LoRA attaches by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fed_dp_lora.config.fields import Group, require, setting

PACKAGED_MODELS = ("minilm", "smollm2")


@dataclass
class ModelConfig(Group):
    """The base model; the presets conf/model/minilm.yaml and smollm2.yaml fill it."""

    KEY: ClassVar[str] = "model"

    name: str = setting(
        help="packaged: `minilm` (all-MiniLM-L6-v2) or `smollm2` (SmolLM2-135M-Instruct, "
        "cached as safetensors in `~/.cache/fed-dp-lora` or `$FED_DP_LORA_CACHE` on first "
        "load); or a Hugging Face model id / local folder"
    )
    task: str = setting(
        "classification",
        "`causal-lm` is instruction tuning on prompt/response pairs",
        choices=("classification", "causal-lm"),
    )
    quantization: str = setting(
        "none", "bitsandbytes 8 or 4 bit (nf4); runs on CPU here, CUDA where present", choices=("none", "8", "4")
    )
    pooling: str = setting(
        "model",
        "classification head input: `cls` (first token), `mean` (token mean, how "
        "all-MiniLM-L6-v2 was trained; for truncated models) or `model` (the "
        "model's own pooler)",
        choices=("model", "cls", "mean"),
    )
    keep_layers: int | None = setting(None, "keep only the first N transformer layers (tests, quick trials); null: all")
    lora_targets: list[str] = setting(help="modules LoRA adapts when `lora.target_modules` is null")

    def validate(self) -> None:
        super().validate()
        require(
            self.keep_layers is None or self.keep_layers >= 1,
            self.key("keep_layers"),
            "must be at least 1",
            "set a positive layer count or null",
        )
        require(
            len(self.lora_targets) > 0,
            self.key("lora_targets"),
            "is empty",
            "name the modules to adapt, e.g. [query,value] (BERT) or [q_proj,v_proj] (Llama)",
        )
