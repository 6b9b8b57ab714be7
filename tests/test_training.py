"""Local training and evaluation: encoding, per-record losses, DP and non-DP steps, metrics.

Classification runs on the tiny BERT (tests/tiny_models.py) and the real credit data. The
causal-LM part runs on the tiny Llama, and again on the packaged SmolLM2 (GGUF converted to
safetensors once per test session, in a temporary cache) truncated to 2 layers in the slow
tier, with its real tokenizer and chat template.
"""

from __future__ import annotations

import math
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fed_dp_lora import models
from fed_dp_lora.config import compose_config, validate
from fed_dp_lora.data import holdout_split, load_table
from fed_dp_lora.models import build_model, load_tokenizer, trainable_state
from fed_dp_lora.privacy.engine import GradientEngine, PrivateGradientEngine
from fed_dp_lora.training import (
    IGNORE,
    encode,
    evaluate,
    majority_baseline,
    by_length,
    per_sample_losses,
    plan_steps,
    record_losses,
    train_local,
)

CAUSAL = ("model.keep_layers=2", "lora.target_modules=[q_proj,v_proj]")


def _cfg(*overrides: str):
    cfg = compose_config(["+preset=tiny", *overrides])
    validate(cfg)
    return cfg


def _changed(before: dict, after: dict) -> dict[str, bool]:
    return {name: not torch.equal(before[name], after[name]) for name in before}


# --- classification: data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(tiny_models):
    """A config factory on the tiny BERT classifier."""
    return lambda *overrides: _cfg(*tiny_models.classifier, *overrides)


@pytest.fixture(scope="module")
def credit_split(clf):
    cfg = clf()
    return holdout_split(load_table(cfg), cfg)


@pytest.fixture(scope="module")
def tokenizer(clf):
    return load_tokenizer(clf())


@pytest.fixture(scope="module")
def train_data(credit_split, tokenizer, clf):
    train, _ = credit_split
    return encode(train.head(16), tokenizer, clf())


@pytest.fixture(scope="module")
def test_data(credit_split, tokenizer, clf):
    _, test = credit_split
    # both classes, so AUC is defined
    sample = pd.concat([test[test["label"] == 0].head(12), test[test["label"] == 1].head(8)])
    return encode(sample.reset_index(drop=True), tokenizer, clf())


def test_encode_classification(credit_split, tokenizer, train_data):
    train, _ = credit_split
    assert len(train_data) == 16
    assert train_data.input_ids.shape == (16, 32) == train_data.attention_mask.shape
    assert train_data.labels.tolist() == train["label"].head(16).tolist()
    assert train_data.labels.dtype == torch.long
    # credit texts are longer than 32 tokens: truncated, ending in [SEP]
    assert (train_data.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (train_data.input_ids[:, -1] == tokenizer.sep_token_id).all()


def test_batch_trims_to_the_longest_record(tokenizer, clf):
    table = pd.DataFrame({"text": ["short", "a somewhat longer text here"], "label": [0, 1]})
    data = encode(table, tokenizer, clf())
    assert data.input_ids.shape == (2, 32)
    batch = data.batch(torch.tensor([0]), torch.device("cpu"))
    assert batch["input_ids"].shape == (1, int(data.attention_mask[0].sum()))
    batch = data.batch(torch.tensor([0, 1]), torch.device("cpu"))
    assert batch["input_ids"].shape[1] == int(data.attention_mask[1].sum())
    assert batch["labels"].tolist() == [0, 1]


def test_plan_steps():
    assert plan_steps(1000, 64, 1.0) == (0.064, round(1 / 0.064))
    assert plan_steps(50, 64, 2.0) == (1.0, 2)  # rate capped at 1
    assert plan_steps(1000, 10, 0.0001)[1] == 1  # at least one step


# --- classification: losses -------------------------------------------------------------------


def test_per_sample_losses_are_per_record(train_data, clf):
    """Each record's loss is independent of the batch it is in (padding, other records)."""
    model = build_model(clf(), 2)
    model.eval()
    weights = torch.tensor([0.7, 1.78])
    cpu = torch.device("cpu")
    index = torch.arange(6)
    with torch.no_grad():
        batch_losses = per_sample_losses(model, train_data.batch(index, cpu), weights)
        single = torch.cat(
            [per_sample_losses(model, train_data.batch(index[i : i + 1], cpu), weights) for i in range(6)]
        )
        unweighted = per_sample_losses(model, train_data.batch(index, cpu), None)
    assert batch_losses.shape == (6,)
    torch.testing.assert_close(batch_losses, single, atol=1e-5, rtol=1e-5)
    # class weights scale each record's loss by its class weight
    torch.testing.assert_close(batch_losses, unweighted * weights[train_data.labels[:6]])


# --- classification: training -----------------------------------------------------------------


def test_train_local_without_privacy_changes_every_adapter_tensor(train_data, clf):
    cfg = clf("privacy=none", "train.lr=0.01")
    model = build_model(cfg, 2)
    before = trainable_state(model)
    engine = GradientEngine(model, 8.0)
    stats = train_local(engine, train_data, cfg, 0.5, 3, torch.tensor([0.7, 1.78]),
                        torch.Generator().manual_seed(0))
    changed = _changed(before, trainable_state(model))
    # B starts at 0, so A only moves from the second step on: all must have moved after 3
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert stats.steps == 3 and stats.empty_batches == 0
    assert 0 < stats.examples <= 3 * len(train_data)
    assert stats.mean_loss > 0 and math.isfinite(stats.mean_loss)
    # the frozen base did not move
    assert all(not p.requires_grad or ".lora_" in n or "modules_to_save" in n
               for n, p in model.named_parameters())


def test_train_local_without_privacy_reduces_training_loss(credit_split, tokenizer, clf):
    """Gradients point the right way: a few steps fit a skewed (14 good / 2 bad) set."""
    train, _ = credit_split
    table = pd.concat([train[train["label"] == 0].head(14), train[train["label"] == 1].head(2)])
    cfg = clf("privacy=none", "train.optimizer=sgd", "train.lr=0.05")
    data = encode(table, tokenizer, cfg)
    model = build_model(cfg, 2)
    everything = torch.arange(len(data))

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(per_sample_losses(model, data.batch(everything, torch.device("cpu")), None).mean())

    start = loss()
    train_local(GradientEngine(model, float(len(data))), data, cfg, 1.0, 5, None,
                torch.Generator().manual_seed(0))
    assert loss() < start - 0.1


def test_train_local_with_privacy_changes_every_adapter_tensor(train_data, clf):
    cfg = clf("train.lr=0.01")
    model = build_model(cfg, 2)
    before = trainable_state(model)
    engine = PrivateGradientEngine(model, 8.0, clip_norm=0.1, noise_multiplier=1.0,
                                   generator=torch.Generator().manual_seed(1))
    try:
        stats = train_local(engine, train_data, cfg, 0.5, 2, torch.tensor([0.7, 1.78]),
                            torch.Generator().manual_seed(0))
    finally:
        engine.detach()
    changed = _changed(before, trainable_state(model))
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert stats.steps == 2 and stats.examples > 0
    assert 0.0 <= engine.last_clipped_fraction <= 1.0
    assert engine.last_clipped_fraction > 0  # C = 0.1 is small: per-record gradients are clipped
    # no per-sample gradient is left behind on the reused model
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_private_step_on_an_empty_batch_is_noise_only(train_data, clf):
    """Poisson sampling can draw no record: the step still happens (noise only)."""
    cfg = clf()
    model = build_model(cfg, 2)
    before = trainable_state(model)
    engine = PrivateGradientEngine(model, 8.0, 1.0, 1.0, torch.Generator().manual_seed(1))
    try:
        stats = train_local(engine, train_data, cfg, 1e-12, 2, None, torch.Generator().manual_seed(0))
    finally:
        engine.detach()
    assert stats.empty_batches == 2 and stats.examples == 0 and stats.mean_loss == 0.0
    assert all(_changed(before, trainable_state(model)).values())


def test_non_private_empty_batch_is_skipped(train_data, clf):
    cfg = clf("privacy=none")
    model = build_model(cfg, 2)
    before = trainable_state(model)
    stats = train_local(GradientEngine(model, 8.0), train_data, cfg, 1e-12, 2, None,
                        torch.Generator().manual_seed(0))
    assert stats.empty_batches == 2
    assert not any(_changed(before, trainable_state(model)).values())


def test_ffa_training_leaves_lora_a_untouched(train_data, clf):
    cfg = clf("lora=ffa", "privacy=none", "train.lr=0.01")
    model = build_model(cfg, 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    before = trainable_state(model)
    train_local(GradientEngine(model, 8.0), train_data, cfg, 0.5, 2, None, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if ".lora_A." in n)
    assert all(_changed(before, trainable_state(model)).values())


# --- classification: evaluation ---------------------------------------------------------------


def test_evaluate_classification_metrics(test_data, clf):
    model = build_model(clf(), 2)
    metrics = evaluate(model, test_data, batch_size=8)  # several batches, the last one short
    assert set(metrics) == {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    for name, value in metrics.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, name
    assert not model.training
    # batch size does not change the result
    again = evaluate(model, test_data, batch_size=64)
    assert again == pytest.approx(metrics)
    # and matches a direct computation
    with torch.no_grad():
        logits = model(input_ids=test_data.input_ids, attention_mask=test_data.attention_mask).logits
    pred = logits.argmax(dim=1)
    accuracy = float((pred == test_data.labels).float().mean())
    assert metrics["accuracy"] == pytest.approx(accuracy)
    probs = torch.softmax(logits, dim=-1)[:, 1].numpy()
    assert metrics["auc"] == pytest.approx(roc_auc_score(test_data.labels.numpy(), probs))


def test_evaluation_batches_records_of_similar_length_and_keeps_their_order(credit_split, tokenizer, clf):
    # Several lengths: the tiny tokenizer spends 70-96 tokens on a credit record (MiniLM's ~52).
    test_data = encode(credit_split[1].head(20), tokenizer, clf("train.max_length=128"))
    lengths = test_data.attention_mask.sum(dim=1)
    order = by_length(test_data)
    assert not torch.equal(order, torch.arange(len(test_data)))  # the data is not already sorted
    assert torch.all(lengths[order][1:] >= lengths[order][:-1])
    model = build_model(clf(), 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B and the head start at zero: every record's loss would be log 2
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        direct = per_sample_losses(model.eval(), test_data.batch(torch.arange(len(test_data)), torch.device("cpu")),
                                   None)
    assert direct.std() > 0.01
    losses = record_losses(model, test_data, batch_size=6)
    np.testing.assert_allclose(losses, direct.double().numpy(), rtol=1e-5, atol=1e-6)


def test_majority_baseline():
    train = np.array([0] * 70 + [1] * 30)
    test = np.array([0] * 8 + [1] * 2)
    metrics = majority_baseline(train, test, 2)
    assert metrics["balanced_accuracy"] == 0.5
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["macro_f1"] == pytest.approx((2 * 0.8 / 1.8 + 0) / 2)
    assert "auc" not in metrics  # a constant predictor has no ranking
    # the majority comes from the training labels, not the test labels
    flipped = majority_baseline(np.array([1] * 10 + [0] * 3), test, 2)
    assert flipped["accuracy"] == pytest.approx(0.2) and flipped["balanced_accuracy"] == 0.5


def test_majority_baseline_on_credit(credit_split):
    train, test = credit_split
    metrics = majority_baseline(train["label"].to_numpy(), test["label"].to_numpy(), 2)
    assert metrics["balanced_accuracy"] == 0.5
    assert metrics["accuracy"] == pytest.approx((test["label"] == 0).mean())


# --- causal LM: the tiny Llama, and SmolLM2 in the slow tier -----------------------------------


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fresh FED_DP_LORA_CACHE with SmolLM2 converted from GGUF once for the session."""
    cache = tmp_path_factory.mktemp("fed-dp-lora-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FED_DP_LORA_CACHE", str(cache))
        start = time.perf_counter()
        folder = models._smollm2_folder()
        seconds = time.perf_counter() - start
    yield cache, folder, seconds
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB of fp32 weights: do not keep them per run


@pytest.fixture
def smol_env(smollm2_cache, monkeypatch):
    cache, _, _ = smollm2_cache
    monkeypatch.setenv("FED_DP_LORA_CACHE", str(cache))
    return _cfg("model=smollm2", *CAUSAL)


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def causal(request, tiny_models, monkeypatch):
    """(config factory, tokenizer) of a causal LM with LoRA on q_proj and v_proj of 2 layers:
    the tiny Llama, or the packaged SmolLM2 with its own tokenizer and chat template."""
    if request.param == "tiny":
        base = tiny_models.causal_lm
    else:
        cache, _, _ = request.getfixturevalue("smollm2_cache")
        monkeypatch.setenv("FED_DP_LORA_CACHE", str(cache))
        base = ("model=smollm2",)

    def make(*overrides: str):
        return _cfg(*base, *CAUSAL, *overrides)

    return make, load_tokenizer(make())


QA = pd.DataFrame(
    {
        "prompt": ["What does APR stand for?", "Is a debt ratio of 80% risky?"],
        "response": ["Annual percentage rate.", "Yes, it is high."],
    }
)


@pytest.mark.slow
def test_smollm2_converted_folder_is_cached_and_reused(smollm2_cache, smol_env, monkeypatch):
    cache, folder, seconds = smollm2_cache
    assert folder == cache / "smollm2-135m-instruct"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no half-written tmp folder left
    assert models.model_source(smol_env) == str(folder)

    # A second load reads the safetensors folder: never the GGUF file again.
    calls = []
    original = models.AutoModelForCausalLM.from_pretrained

    def spy(source, *args, **kwargs):
        calls.append((str(source), kwargs))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    model = build_model(smol_env, None)
    reload_seconds = time.perf_counter() - start
    assert calls and all(src == str(folder) and "gguf_file" not in kw for src, kw in calls)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert reload_seconds < 15 and reload_seconds < max(seconds, 20)
    assert model.config.num_hidden_layers == 2


def test_causal_lm_lora_trains_only_q_and_v_factors(causal):
    make, _ = causal
    model = build_model(make(), None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # A, B on q_proj, v_proj in 2 layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "v_proj"}
    assert len(model.base_model.model.model.layers) == 2
    assert model.get_output_embeddings().weight.requires_grad is False


def test_encode_masks_the_prompt_and_keeps_the_response(causal):
    make, tok = causal
    cfg = make("train.max_length=64")
    data = encode(QA, tok, cfg)
    assert data.input_ids.shape == data.labels.shape == (2, 64)
    for i, response in enumerate(QA["response"]):
        labels, ids, mask = data.labels[i], data.input_ids[i], data.attention_mask[i]
        length = int(mask.sum())
        kept = (labels != IGNORE).nonzero().squeeze(1)
        # the response is one contiguous block at the end of the record
        assert kept.tolist() == list(range(int(kept[0]), length))
        assert torch.equal(labels[kept], ids[kept])
        assert tok.decode(ids[kept]) == response + tok.eos_token
        # everything before it is the (chat-formatted) prompt, masked
        prompt = tok.decode(ids[: int(kept[0])])
        assert QA["prompt"][i] in prompt and "<|im_start|>user" in prompt
        assert prompt.rstrip().endswith("<|im_start|>assistant")
        # padding: no attention, no loss
        assert (mask[length:] == 0).all() and (labels[length:] == IGNORE).all()


def test_encode_truncates_the_prompt_not_the_response(causal):
    make, tokenizer = causal
    cfg = make()  # max_length 32: the credit prompts are longer
    table = load_table(cfg).head(4)
    data = encode(table, tokenizer, cfg)
    assert data.input_ids.shape == (4, 32)
    for i, response in enumerate(table["response"]):
        assert int(data.attention_mask[i].sum()) == 32
        kept = data.labels[i] != IGNORE
        assert tokenizer.decode(data.input_ids[i][kept]) == response + tokenizer.eos_token
        assert int((~kept).sum()) > 20  # most of the record is prompt, masked


def test_causal_per_sample_loss_is_the_mean_over_the_records_response(causal):
    make, tokenizer = causal
    model = build_model(make(), None)
    model.eval()
    cfg = make("train.max_length=64")
    data = encode(QA, tokenizer, cfg)
    cpu = torch.device("cpu")
    with torch.no_grad():
        losses = per_sample_losses(model, data.batch(torch.arange(2), cpu), None)
        for i in range(2):
            one = data.batch(torch.tensor([i]), cpu)
            reference = model(**one).loss  # HF's mean over this record's response tokens
            torch.testing.assert_close(losses[i], reference, atol=1e-4, rtol=1e-4)


def test_causal_lm_dp_step_and_evaluate(causal):
    make, tokenizer = causal
    cfg = make("train.max_length=64")
    model = build_model(cfg, None)
    data = encode(QA, tokenizer, cfg)
    metrics = evaluate(model, data, batch_size=1)
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["loss"] > 0 and math.isfinite(metrics["perplexity"])
    assert metrics["perplexity"] == pytest.approx(math.exp(min(metrics["loss"], 50.0)))
    # token-weighted over the whole set, independent of the batch size
    assert evaluate(model, data, batch_size=2)["loss"] == pytest.approx(metrics["loss"], rel=1e-4)

    before = trainable_state(model)
    engine = PrivateGradientEngine(model, 2.0, 1.0, 0.5, torch.Generator().manual_seed(0))
    try:
        stats = train_local(engine, data, cfg, 1.0, 1, None, torch.Generator().manual_seed(0))
    finally:
        engine.detach()
    assert stats.steps == 1 and stats.examples == 2 and stats.empty_batches == 0
    assert math.isfinite(stats.mean_loss) and stats.mean_loss > 0
    changed = _changed(before, trainable_state(model))
    assert all(changed.values()), [n for n, c in changed.items() if not c]


@pytest.mark.parametrize("per_sample", ["fused", "opacus"])
def test_causal_lm_clipped_sum_matches_one_record_at_a_time(causal, per_sample):
    """The privacy unit of a causal LM is one sequence: each one's clipped gradient, summed."""
    make, tokenizer = causal
    cfg = make("train.max_length=64")
    model = build_model(cfg, None)
    model.train()
    qa = pd.concat([QA, QA.assign(response=["APR.", "No."])], ignore_index=True)
    data = encode(qa, tokenizer, cfg)
    n = len(data)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # B starts at zero, which would make every A gradient zero
        gen = torch.Generator().manual_seed(1)
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    per_record = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        per_sample_losses(model, data.batch(torch.tensor([i]), torch.device("cpu")), None).sum().backward()
        per_record.append({name: p.grad.detach().double().clone() for name, p in params.items()})
    model.zero_grad(set_to_none=True)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())) for grads in per_record]
    clip = sorted(norms)[n // 2 - 1] * 1.0001  # the two longest-gradient records get clipped
    assert sum(norm > clip for norm in norms) == n // 2
    expected = {name: sum(min(1.0, clip / norm) * grads[name] for grads, norm in zip(per_record, norms))
                for name in params}

    engine = PrivateGradientEngine(model, 1.0, clip, 0.0, torch.Generator(), per_sample=per_sample)
    try:
        engine.backward(per_sample_losses(engine.module, data.batch(torch.arange(n), torch.device("cpu")), None))
        assert engine.finalize(n) is True
    finally:
        engine.detach()
    for name, p in params.items():
        assert expected[name].norm() > 0, f"{name}: zero reference gradient, the test would be vacuous"
        rel = float((p.grad.double() - expected[name]).norm() / expected[name].norm())
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


def test_bf16_autocast_only_on_a_cuda_device_that_supports_it(monkeypatch):
    import contextlib

    from fed_dp_lora.training import compute_precision

    assert isinstance(compute_precision(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert isinstance(compute_precision(torch.device("cuda")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ctx = compute_precision(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_without_a_generator_the_batches_do_not_come_from_torchs_global_generator():
    """Model loading seeds torch's global generator with a public seed: the server could replay
    batches drawn from it. Both recipes' step loop (poisson_steps) draws from OS entropy instead."""
    from fed_dp_lora.training import poisson_steps

    runs = []
    for _ in range(2):
        drawn: list[list[int]] = []

        def backward(index: torch.Tensor) -> tuple[int, float]:
            drawn.append(index.tolist())
            return len(index), 0.0

        torch.manual_seed(0)
        stats = poisson_steps(GradientEngine(torch.nn.Linear(2, 2), 32.0), _cfg(), 64, 0.5, 3, None, backward)
        assert stats.steps == 3 and stats.rows == sum(len(d) for d in drawn)
        runs.append(drawn)
    assert runs[0] != runs[1]  # the same public seed, other batches (equal by chance: 2^-192)
