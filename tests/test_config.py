"""Configuration: Hydra composition, validation and the errors a user sees before training."""

from __future__ import annotations

import pandas as pd
import pytest

from fed_dp_lora import client_round
from fed_dp_lora.client_round import RoundRequest
from fed_dp_lora.config import ConfigError, compose_config, load_config, to_plain, validate
from fed_dp_lora.data import client_partition
from tests.client_helpers import initial_adapter


def _error(*overrides: str) -> str:
    """The message of the ConfigError that composing + validating these overrides raises."""
    with pytest.raises(ConfigError) as info:
        cfg = compose_config(["+preset=tiny", *overrides])
        validate(cfg)
    return str(info.value)


# --- composition --------------------------------------------------------------------------


def test_defaults_compose_and_validate(make_cfg):
    cfg = make_cfg()
    assert cfg.model.name == "minilm" and cfg.model.task == "classification"
    assert cfg.lora.mode == "vanilla" and cfg.privacy.enabled is True
    assert cfg.data.source == "credit" and cfg.data.partitioner == "iid"
    # the tiny preset is applied on top of the defaults
    assert cfg.model.keep_layers == 2 and cfg.train.max_length == 32 and cfg.rounds == 1


def test_groups_select_their_options(make_cfg):
    cfg = make_cfg("model=smollm2", "lora=ffa", "privacy=none", "data=file")
    assert cfg.model.task == "causal-lm" and cfg.model.name == "smollm2"
    assert cfg.lora.mode == "ffa" and cfg.lora.r == 8  # ffa inherits vanilla's keys
    # privacy=none inherits every other privacy key from privacy=dp
    assert cfg.privacy.enabled is False and cfg.privacy.clip_norm == compose_config(["+preset=tiny"]).privacy.clip_norm
    assert cfg.data.source == "file" and cfg.data.class_weights is None


def test_load_config_reads_overrides_from_the_run_config():
    cfg = load_config({"overrides": "privacy.epsilon=2 lora.r=16", "output-dir": ""})
    assert cfg.privacy.epsilon == 2 and cfg.lora.r == 16
    assert cfg.output_dir is None
    # untouched keys keep their defaults
    assert cfg.lora.alpha == 16 and cfg.rounds == compose_config([]).rounds


def test_load_config_quoted_list_override():
    cfg = load_config({"overrides": "'lora.target_modules=[query,key,value]' privacy=none"})
    assert list(cfg.lora.target_modules) == ["query", "key", "value"]
    assert cfg.privacy.enabled is False


def test_load_config_accepts_absolute_output_dir(tmp_path):
    cfg = load_config({"overrides": "", "output-dir": str(tmp_path)})
    assert cfg.output_dir == str(tmp_path)
    assert to_plain(cfg)["output_dir"] == str(tmp_path)


# --- errors: unknown names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("model.task=foo", "model.task", "classification"),
        ("lora.mode=bar", "lora.mode", "ffa"),
        ("data.partitioner=shards", "data.partitioner", "dirichlet"),
        ("privacy.accountant=gdp", "privacy.accountant", "prv"),
        ("train.optimizer=lion", "train.optimizer", "adam"),
        ("model.quantization=3", "model.quantization", "4"),
        ("data.source=s3", "data.source", "file"),
    ],
)
def test_unknown_option_value_names_key_and_choices(override, key, valid):
    message = _error(override)
    assert message.startswith(key + ":")
    assert "Fix:" in message and valid in message


@pytest.mark.parametrize("override, group", [("model=foo", "model"), ("lora=baz", "lora")])
def test_unknown_group_option_lists_available_options(override, group):
    message = _error(override)
    assert f"{group}/{override.split('=')[1]}" in message
    assert "Available options" in message
    assert "groups are listed in conf/" in message


@pytest.mark.parametrize("override", ["lora.rank=4", "+lora.rank=4"])
def test_unknown_key_is_rejected_by_the_schema(override):
    message = _error(override)
    assert message.startswith("lora.rank: no such key. Fix: did you mean lora.r?"), message
    assert "\n" not in message


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"invalid override .*lora\.r=\[1"):
        load_config({"overrides": "lora.r=[1"})


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.epsilon=", "privacy.epsilon"),
        ("lora.r=abc", "lora.r"),
        ("lora.r=2.5", "lora.r"),  # would silently train rank 2
        ("train.lr=fast", "train.lr"),
        ("rounds=true", "rounds"),
        ("train.batch_size=[64]", "train.batch_size"),
    ],
)
def test_wrong_type_names_key_and_fix(override, key):
    with pytest.raises(ConfigError) as info:
        load_config({"overrides": override})
    message = str(info.value)
    assert message.startswith(key + ":") and "Fix: set " + key in message


# --- errors: values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["privacy.epsilon=0"], "privacy.epsilon"),
        (["privacy.epsilon=-1"], "privacy.epsilon"),
        (["privacy.epsilon=null"], "privacy.epsilon"),  # neither budget nor noise multiplier
        (["privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
        (["privacy.delta=1"], "privacy.delta"),
        (["privacy.delta=0"], "privacy.delta"),
        (["privacy.clip_norm=0"], "privacy.clip_norm"),
        (["lora.r=0"], "lora.r"),
        (["lora.r=-2"], "lora.r"),
        (["lora.alpha=0"], "lora.alpha"),
        (["lora.dropout=1"], "lora.dropout"),
        (["lora.target_modules=[]"], "lora.target_modules"),
        (["model.keep_layers=0"], "model.keep_layers"),
        (["data.test_fraction=0"], "data.test_fraction"),
        (["data.test_fraction=1"], "data.test_fraction"),
        (["data.partitioner=dirichlet", "data.dirichlet_alpha=0"], "data.dirichlet_alpha"),
        (["data.partitioner=dirichlet", "model=smollm2"], "data.partitioner"),
        (["data.partitioner=column"], "data.partition_column"),
        (["data.source=hub"], "data.name"),
        (["rounds=0"], "rounds"),
        (["train.epochs=0"], "train.epochs"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.lr=0"], "train.lr"),
        (["train.max_length=4"], "train.max_length"),
        (["eval.batch_size=0"], "eval.batch_size"),
        (["eval.batch_size=big"], "eval.batch_size"),
        (["eval.batch_size=2.5"], "eval.batch_size"),
        (["eval.batch_size=true"], "eval.batch_size"),
        (["strategy.fraction_train=0"], "strategy.fraction_train"),
        (["strategy.fraction_train=1.5"], "strategy.fraction_train"),
        (["audit.release.guesses=201"], "audit.release.guesses"),  # half "in", half "out"
        (["audit.release.guesses=1002"], "audit.release.guesses"),
        (["audit.release.client=-1"], "audit.release.client"),
        (["audit.release.enabled=yes"], "audit.release.enabled"),
        (["audit.release.enabled=true", "secagg=true"], "audit.release"),
    ],
)
def test_invalid_value_names_key_and_fix(overrides, key):
    message = _error(*overrides)
    assert message.startswith(key + ":"), message
    assert "Fix:" in message


def test_privacy_checks_do_not_apply_when_privacy_is_off(make_cfg):
    cfg = make_cfg("privacy=none", "privacy.epsilon=0", "privacy.delta=5")
    assert cfg.privacy.enabled is False


def test_noise_multiplier_alone_is_a_valid_privacy_setting(make_cfg):
    cfg = make_cfg("privacy.epsilon=null", "privacy.noise_multiplier=1.1")
    assert cfg.privacy.noise_multiplier == 1.1


def test_epsilon_error_is_raised_by_load_config():
    with pytest.raises(ConfigError, match=r"^privacy\.epsilon: .*Fix: use a positive budget"):
        load_config({"overrides": "privacy.epsilon=0"})


def test_rank_error_is_raised_by_load_config():
    with pytest.raises(ConfigError, match=r"^lora\.r: rank 0 < 1\. Fix"):
        load_config({"overrides": "lora.r=0"})


@pytest.mark.parametrize("output_dir", ["outputs/run1", "./out", "~/out"])
def test_relative_output_dir_is_rejected(output_dir):
    with pytest.raises(ConfigError) as info:
        load_config({"overrides": "", "output-dir": output_dir})
    message = str(info.value)
    assert message.startswith("output-dir:") and "absolute" in message and "Fix:" in message


# --- checks against the data ----------------------------------------------------------------


def test_partition_count_larger_than_data(make_cfg):
    cfg = make_cfg()
    train = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(ConfigError) as info:
        client_partition(train, cfg, 0, 4)
    message = str(info.value)
    assert message.startswith("num-partitions:") and "3 training records" in message
    assert "num-supernodes" in message


def test_delta_error_stops_the_round_before_any_training(make_cfg, monkeypatch):
    """The client's checks against its (public) record count run before train_local is ever called."""
    cfg = make_cfg("privacy.delta=0.01")  # 4 clients of ~890 records: 1/records ~ 0.0011 < delta
    called = []
    monkeypatch.setattr(client_round, "train_local", lambda *a, **k: called.append(1))
    state = initial_adapter(cfg)
    with pytest.raises(client_round.PolicyError, match=r"delta 0\.01 >= 1/records"):
        client_round.train_round(cfg, {"partition-id": 0, "num-partitions": 4}, RoundRequest(state), None)
    assert called == []


def test_partition_count_error_stops_the_round_before_any_training(make_cfg, monkeypatch):
    cfg = make_cfg()
    called = []
    monkeypatch.setattr(client_round, "train_local", lambda *a, **k: called.append(1))
    with pytest.raises(ConfigError, match="^num-partitions"):
        client_round.train_round(cfg, {"partition-id": 0, "num-partitions": 5000}, RoundRequest({}), None)
    assert called == []


# --- strategies, SecAgg+ and attacks: what composes --------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "dp-fedavg", "krum", "multi-krum", "trimmed-mean", "median"])
def test_every_strategy_composes_from_its_group(make_cfg, name):
    assert make_cfg(f"strategy={name}").strategy.name == name


@pytest.mark.parametrize("name", ["krum", "multi-krum", "trimmed-mean", "median"])
def test_robust_aggregation_under_secagg_is_refused_with_the_alternative(name):
    message = _error(f"strategy={name}", "secagg=true")
    assert message.startswith("secagg:") and "only their sum" in message
    assert "strategy=fedavg or strategy=dp-fedavg with secagg=true" in message


def test_adaptive_clipping_under_secagg_is_refused():
    message = _error("strategy=dp-fedavg", "strategy.adaptive=true", "secagg=true")
    assert "unmasked" in message and "strategy.adaptive=false" in message


@pytest.mark.parametrize("kind", ["non-finite", "wrong-shape"])
def test_unrejectable_attacks_under_secagg_are_refused(kind):
    message = _error("secagg=true", "attack.fraction=0.25", f"attack.kind={kind}")
    assert message.startswith("attack.kind:") and "secagg=false" in message


@pytest.mark.parametrize(
    "overrides",
    [["secagg=true"], ["strategy=dp-fedavg", "secagg=true"], ["strategy=krum", "attack.fraction=0.25"],
     ["strategy=dp-fedavg", "strategy.adaptive=true"], ["secagg=true", "attack.fraction=0.25"]],
)
def test_valid_combinations_are_accepted(make_cfg, overrides):
    make_cfg(*overrides)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["strategy=trimmed-mean", "strategy.beta=0.5"], "strategy.beta"),
        (["strategy=krum", "strategy.num_malicious=-1"], "strategy.num_malicious"),
        (["strategy=multi-krum", "strategy.num_selected=0"], "strategy.num_selected"),
        (["strategy=dp-fedavg", "strategy.sampling=poisson"], "strategy.sample_rate"),
        (["strategy=dp-fedavg", "strategy.sampling=shuffle"], "strategy.sampling"),
        (["strategy=dp-fedavg", "strategy.clip_norm=0"], "strategy.clip_norm"),
        (["strategy=dp-fedavg", "strategy.noise_multiplier=null"], "strategy.noise_multiplier"),
        (["strategy=dp-fedavg", "strategy.delta=1"], "strategy.delta"),
        (["strategy=dp-fedavg", "strategy.clip_norm=9", "secagg=true"], "secaggplus.clipping_range"),
        (["strategy.name=fedprox"], "strategy.name"),
        (["attack.kind=label-flip"], "attack.kind"),
        (["attack.fraction=1"], "attack.fraction"),
        (["secagg=maybe"], "secagg"),
        (["secagg=true", "secaggplus.reconstruction_threshold=1.5"], "secaggplus.reconstruction_threshold"),
    ],
)
def test_invalid_strategy_settings_name_the_key(overrides, key):
    assert _error(*overrides).startswith(f"{key}:")


def test_refused_combination_stops_the_server_before_any_message(tmp_path):
    from fed_dp_lora.experiments.inprocess import run_federation

    with pytest.raises(ConfigError, match="SecAgg"):
        run_federation("+preset=tiny strategy=median secagg=true", 2, tmp_path)
    assert not (tmp_path / "summary.json").exists()


# --- resume and uploads ---------------------------------------------------------------------

def test_resume_needs_an_output_dir_and_refuses_secagg(tmp_path):
    assert load_config({"overrides": "+preset=tiny", "output-dir": str(tmp_path), "resume": True}).resume
    with pytest.raises(ConfigError, match="resume: needs the stopped run's output-dir"):
        load_config({"overrides": "+preset=tiny", "resume": True})
    with pytest.raises(ConfigError, match="resume.*SecAgg"):
        load_config({"overrides": "+preset=tiny secagg=true", "output-dir": str(tmp_path), "resume": True})
    with pytest.raises(ConfigError, match="resume: 'maybe' is not true or false"):
        load_config({"overrides": "+preset=tiny", "output-dir": str(tmp_path), "resume": "maybe"})


def test_int8_upload_is_refused_under_secagg(make_cfg):
    with pytest.raises(ConfigError, match="upload.compression.*SecAgg"):
        make_cfg("secagg=true", "upload.compression=int8")
    with pytest.raises(ConfigError, match="upload.compression"):
        make_cfg("upload.compression=fp4")


def test_the_default_recipe_is_the_linear_probe_and_lora_stays_selectable():
    cfg = compose_config([])
    assert cfg.train.method == "linear-probe" and cfg.train.lr is None and cfg.privacy.clip_norm == 1.0
    assert cfg.train.max_length == cfg.data.max_length == 64 and cfg.data.lr.private == 0.1
    lora = compose_config(["recipe=lora", "lora=ffa"])
    assert lora.train.method == "lora" and lora.lora.mode == "ffa" and lora.train.lr == 0.003
    reviews = compose_config(["data=reviews"])
    assert reviews.train.max_length == 128 and reviews.data.lr.private == 0.03
    user = compose_config(["data=file"])
    assert user.data.class_weights is None and user.train.max_length == 128


@pytest.mark.parametrize("overrides, key", [
    (["train.method=finetune"], "train.method"),
    (["model=smollm2"], "train.method"),                    # a probe needs a classification head
    (["audit.enabled=true"], "audit"),
    (["data.lr.private=0"], "data.lr.private"),
    (["probe.center_noise_multiplier=0"], "probe.center_noise_multiplier"),
    (["probe.center=maybe"], "probe.center"),
])
def test_linear_probe_settings_are_validated(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_config(overrides))
