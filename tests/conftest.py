"""Shared fixtures. Tests never touch the network: Hugging Face runs offline, Flower quiet."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Simulated clients keep their state under FED_DP_LORA_STATE; tests never touch ~/.local.
os.environ.setdefault("FED_DP_LORA_STATE", tempfile.mkdtemp(prefix="fdl-test-state-"))
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fed_dp_lora.config import compose_config, validate  # noqa: E402


@pytest.fixture
def make_cfg():
    """Compose a validated config with the tiny preset plus extra Hydra overrides."""

    def _make(*overrides: str) -> DictConfig:
        cfg = compose_config(["+preset=tiny", *overrides])
        validate(cfg)
        return cfg

    return _make


@pytest.fixture
def task_identity():
    """Messages built outside the runtime take run/node/task ids from TaskIdentity (internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
