"""The app check: only the installed code or a pinned bundle is accepted, byte for byte.

Bundles are built by Flower's own builder (what `flwr run` sends) from a copy of this checkout,
then changed the ways a server could change them.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from fed_dp_lora.deploy.app_check import AppCheckError, AppPolicy, build_reference, installed_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference() -> bytes:
    return build_reference(installed_root())


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of what `flwr run .` bundles from this checkout, to change."""
    copy = tmp_path / "app"
    for name in ("fed_dp_lora", "conf"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(ROOT / name, copy / name)
    return copy


def rezip(fab: bytes, change) -> bytes:
    """The bundle with its files passed through change(dict) -> dict."""
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in change(files).items():
            z.writestr(name, data)
    return out.getvalue()


def test_the_installed_root_is_this_checkout_and_the_reference_bundles_code_and_conf_only(reference):
    assert installed_root() == ROOT
    names = zipfile.ZipFile(io.BytesIO(reference)).namelist()
    assert "fed_dp_lora/client_app.py" in names and "conf/config.yaml" in names
    assert {n.split("/")[0] for n in names} == {"fed_dp_lora", "conf", "pyproject.toml", ".info"}


def test_a_bundle_built_from_the_same_code_is_accepted_as_installed(reference, checkout):
    verdict = AppPolicy(reference).check(build_reference(checkout))
    assert verdict.accepted and verdict.source == "installed" and verdict.problems == ()


@pytest.mark.parametrize("change, problem", [
    (lambda d: (d / "fed_dp_lora" / "client_round.py").write_text(
        (d / "fed_dp_lora" / "client_round.py").read_text() + "\n# one more line\n"),
     "changed file fed_dp_lora/client_round.py"),
    (lambda d: (d / "conf" / "privacy" / "dp.yaml").write_text(
        (d / "conf" / "privacy" / "dp.yaml").read_text().replace("enabled", "enabled ", 1)),
     "changed file conf/privacy/dp.yaml"),
    (lambda d: (d / "fed_dp_lora" / "evil.py").write_text("import os\n"), "extra file fed_dp_lora/evil.py"),
    (lambda d: (d / "fed_dp_lora" / "attacks.py").unlink(), "missing file fed_dp_lora/attacks.py"),
])
def test_a_changed_added_or_removed_file_is_refused_and_named(reference, checkout, change, problem):
    change(checkout)
    verdict = AppPolicy(reference).check(build_reference(checkout))
    assert not verdict.accepted and verdict.source is None
    assert verdict.problems == (problem,)


def test_a_module_that_would_shadow_a_library_is_refused(reference):
    """A bundle's folder goes first on sys.path: a sklearn.py at its root would replace the real one."""
    fab = rezip(reference, lambda files: {**files, "sklearn.py": b"raise SystemExit\n"})
    assert AppPolicy(reference).check(fab).problems == ("extra file sklearn.py",)


def test_another_clientapp_component_in_pyproject_is_refused(reference, checkout):
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('clientapp = "fed_dp_lora.client_app:app"',
                                                       'clientapp = "fed_dp_lora.attacks:app"'))
    assert AppPolicy(reference).check(build_reference(checkout)).problems == ("changed file pyproject.toml",)


def test_a_pinned_hash_accepts_that_bundle_and_no_other(reference, checkout):
    (checkout / "fed_dp_lora" / "extra_module.py").write_text("VALUE = 1\n")
    pinned = build_reference(checkout)
    policy = AppPolicy(reference, [hashlib.sha256(pinned).hexdigest().upper()])
    verdict = policy.check(pinned)
    assert verdict.source == "pinned" and verdict.problems == ("extra file fed_dp_lora/extra_module.py",)
    (checkout / "fed_dp_lora" / "extra_module.py").write_text("VALUE = 2\n")
    assert not policy.check(build_reference(checkout)).accepted


def test_unreadable_and_duplicate_bundles_are_refused(reference):
    policy = AppPolicy(reference)
    assert policy.check(b"not a zip").problems[0].startswith("unreadable bundle")
    with zipfile.ZipFile(io.BytesIO(reference)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("fed_dp_lora/client_app.py", b"# second copy\n")  # zipfile warns; extraction takes the last
    assert policy.check(out.getvalue()).problems == ("unreadable bundle: the bundle names a file twice",)


def test_a_bad_pin_or_a_missing_checkout_is_a_one_line_error(reference, tmp_path):
    with pytest.raises(AppCheckError, match="not a SHA-256 hex digest"):
        AppPolicy(reference, ["abc"])
    with pytest.raises(AppCheckError, match="no pyproject.toml in"):
        build_reference(tmp_path)
