"""The per-process caches of a client's model and token table are keyed by exactly what builds them."""

from __future__ import annotations

import pytest
from omegaconf.errors import ConfigAttributeError

from fed_dp_lora.client_data import TableSpec, cached_model
from fed_dp_lora.models import ModelSpec


def test_model_spec_follows_what_the_builder_reads(tiny_cfg):
    base = ModelSpec.of(tiny_cfg(), 2)
    # settings the model builder never reads leave the key (and the cached model) alone
    assert ModelSpec.of(tiny_cfg("train.lr=0.1", "data.test_fraction=0.3", "privacy.epsilon=2"), 2) == base
    for override in ("recipe=linear-probe", "lora.r=4", "lora=ffa", "lora.init_seed=1", "model.pooling=cls",
                     "model.keep_layers=1",
                     "train.gradient_checkpointing=true", "lora.target_modules=[query]"):
        assert ModelSpec.of(tiny_cfg(override), 2) != base, override
    assert ModelSpec.of(tiny_cfg(), 3) != base  # the head's size
    hash(base)


def test_cached_model_is_reused_across_settings_it_does_not_read(tiny_cfg):
    model = cached_model(tiny_cfg())
    assert cached_model(tiny_cfg("train.lr=0.1", "train.batch_size=7")) is model
    assert cached_model(tiny_cfg("lora.r=4")) is not model


def test_the_table_builder_cannot_read_a_setting_outside_its_key(tiny_cfg):
    spec = TableSpec.of(tiny_cfg())
    cfg = spec.config()
    assert cfg.data.source == "credit" and cfg.train.max_length == 32 and cfg.audit.enabled is False
    with pytest.raises(ConfigAttributeError):
        cfg.train.lr  # noqa: B018
    assert TableSpec.of(tiny_cfg("train.lr=0.1", "lora.r=4")) == spec
    assert TableSpec.of(tiny_cfg("train.max_length=16")) != spec
    assert TableSpec.of(tiny_cfg("data.partitioner=dirichlet")) != spec
