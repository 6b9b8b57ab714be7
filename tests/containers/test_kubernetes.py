"""containers/kubernetes/*.yaml pass offline schema validation, and every Secret and claim they mount exists.

The schemas come from the installed `kubernetes-validate` package (no network, no cluster):
strict validation, which also rejects fields Kubernetes does not know, against the oldest and
the newest Kubernetes release it ships. The Secrets are the ones scripts/containers/k8s_secrets.py
writes from real certificate and key files (scripts/deploy/make-certs.sh, supernode.sh --keygen-only).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "containers" / "kubernetes").glob("*.yaml"))
VERSIONS = [kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version()]

spec = importlib.util.spec_from_file_location("k8s_secrets", ROOT / "scripts" / "containers" / "k8s_secrets.py")
k8s_secrets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(k8s_secrets)


def _documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate(doc: dict, version: str) -> None:
    """Raise if `doc` is invalid or its kind has no schema (a missing schema is no pass)."""
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    federation = tmp_path_factory.mktemp("federation")
    subprocess.run(["bash", str(ROOT / "scripts" / "deploy" / "make-certs.sh"), str(federation / "certs"),
                    "superlink"], check=True, capture_output=True)
    for i in range(3):
        subprocess.run(["bash", str(ROOT / "scripts" / "deploy" / "supernode.sh"), "--key",
                        str(federation / "keys" / f"institution-{i}"), "--keygen-only"],
                       check=True, capture_output=True)
    return federation


@pytest.fixture(scope="module")
def secrets(federation) -> list[dict]:
    return k8s_secrets.secrets(federation, namespace="fed-dp-lora")


def test_there_are_manifests_for_the_superlink_and_each_institution():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _documents()}
    assert {("Deployment", "superlink"), ("Service", "superlink"), ("PersistentVolumeClaim", "superlink-state")} <= kinds
    for i in range(3):
        assert {("Deployment", f"institution-{i}"), ("PersistentVolumeClaim", f"institution-{i}-state")} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    for doc in _documents():
        _validate(doc, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_generated_secrets_validate(secrets, version):
    assert [s["metadata"]["name"] for s in secrets] == [
        "superlink-tls", "federation-ca", "institution-0-key", "institution-1-key", "institution-2-key"]
    for doc in secrets:
        _validate(doc, version)


def test_the_validation_can_fail():
    deployment = next(d for d in _documents() if d["kind"] == "Deployment")
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo of volumeMounts
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    for doc in (unknown, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate(doc, VERSIONS[-1])


def test_every_mounted_secret_key_and_claim_exists(secrets):
    data = {s["metadata"]["name"]: set(s["data"]) for s in secrets}
    claims = {d["metadata"]["name"] for d in _documents() if d["kind"] == "PersistentVolumeClaim"}
    pods = [d["spec"]["template"]["spec"] for d in _documents() if d["kind"] == "Deployment"]
    pods += [d["spec"] for d in _documents() if d["kind"] == "Pod"]
    for pod in pods:
        for volume in pod["volumes"]:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in data, name
                assert {item["key"] for item in volume["secret"]["items"]} <= data[name], name
            else:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume


def test_the_ca_private_key_is_in_no_secret(federation, secrets):
    ca_key = (federation / "certs" / "ca.key").read_bytes()
    values = [base64.b64decode(v) for s in secrets for v in s["data"].values()]
    assert (federation / "certs" / "server.key").read_bytes() in values  # the comparison can match
    assert ca_key not in values
