"""Shared fixtures. Tests never touch the network: Hugging Face runs offline, Flower quiet.

Two tiers: `pytest -m "not slow and not e2e"` (the fast tier: tiny random models, seconds)
and plain `pytest` (everything: the packaged models, real training, the Flower runtime).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Simulated clients keep their state under FED_DP_LORA_STATE; tests never touch ~/.local. The
# session that made the folder removes it (processes it starts inherit the variable).
if "FED_DP_LORA_STATE" not in os.environ:
    os.environ["FED_DP_LORA_STATE"] = tempfile.mkdtemp(prefix="fdl-test-state-")
    atexit.register(shutil.rmtree, os.environ["FED_DP_LORA_STATE"], ignore_errors=True)
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fed_dp_lora.config import compose_config, validate  # noqa: E402
from tests.tiny_models import save_tiny_bert, save_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _own_client_state(tmp_path_factory, monkeypatch):
    """Each test's simulated institutions start with empty state dirs, as each run's would
    (study ids repeat across tests; their ledgers must not)."""
    monkeypatch.setenv("FED_DP_LORA_STATE", str(tmp_path_factory.mktemp("client-state")))


@pytest.fixture(autouse=True)
def _one_thread_unless_heavy(request):
    """Fast-tier tests run on one intra-op thread: their matrices are tiny, and on 2 cores
    shared with other jobs a second thread mostly spins waiting for a core. slow and e2e
    tests keep the threads they are given."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("e2e"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg():
    """Compose a validated config with the tiny preset plus extra Hydra overrides."""

    def _make(*overrides: str) -> DictConfig:
        cfg = compose_config(["+preset=tiny", *overrides])
        validate(cfg)
        return cfg

    return _make


@dataclass(frozen=True)
class TinyModels:
    """Local model folders of tiny random models, and the overrides that select them."""

    bert: Path
    llama: Path

    @property
    def classifier(self) -> tuple[str, ...]:
        return (f"model.name={self.bert}",)

    @property
    def causal_lm(self) -> tuple[str, ...]:
        return ("model=smollm2", f"model.name={self.llama}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """A 2-layer BERT and a 2-layer Llama (hidden 64), made once per session, offline."""
    root = tmp_path_factory.mktemp("tiny-models")
    return TinyModels(save_tiny_bert(root / "bert"), save_tiny_llama(root / "llama"))


@pytest.fixture
def tiny_cfg(make_cfg, tiny_models):
    """make_cfg on the tiny BERT classifier instead of the packaged MiniLM."""
    return lambda *overrides: make_cfg(*tiny_models.classifier, *overrides)


@pytest.fixture
def task_identity():
    """Messages built outside the runtime take run/node/task ids from TaskIdentity (internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
