"""Write the Kubernetes Secrets that containers/kubernetes/*.yaml mount, from certificate and key files.

Usage (any Python >= 3.10; prints YAML, pipe it to `kubectl apply -f -`):
    python3 scripts/containers/k8s_secrets.py DIR [--namespace NS]

DIR is laid out as scripts/containers/federation.sh makes it; every Secret whose files exist
is written, so each party runs it on what it holds:
- superlink-tls (operator): certs/ca.crt, certs/server.pem, certs/server.key;
- federation-ca (every institution): certs/ca.crt;
- institution-N-key (institution N): keys/institution-N, its private key, as supernode.key.
The CA's own key (certs/ca.key) is never read. The output holds private keys: write it to no
file you keep, and commit none of it.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path


def secret(name: str, files: dict[str, Path], namespace: str | None) -> dict:
    """A kubernetes Opaque Secret holding `files` under their keys."""
    metadata: dict = {"name": name, "labels": {"app.kubernetes.io/name": "fed-dp-lora"}}
    if namespace:
        metadata["namespace"] = namespace
    data = {key: base64.b64encode(path.read_bytes()).decode("ascii") for key, path in files.items()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "data": data}


def secrets(directory: Path, namespace: str | None = None) -> list[dict]:
    """Every Secret the manifests mount whose files are in `directory`."""
    certs, out = directory / "certs", []
    tls = {"ca.crt": certs / "ca.crt", "server.pem": certs / "server.pem", "server.key": certs / "server.key"}
    if all(path.is_file() for path in tls.values()):
        out.append(secret("superlink-tls", tls, namespace))
    if tls["ca.crt"].is_file():
        out.append(secret("federation-ca", {"ca.crt": tls["ca.crt"]}, namespace))
    for key in sorted((directory / "keys").glob("institution-*")):
        if re.fullmatch(r"institution-\d+", key.name):
            out.append(secret(f"{key.name}-key", {"supernode.key": key}, namespace))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--namespace", default=None)
    args = parser.parse_args(argv)
    found = secrets(args.directory, args.namespace)
    if not found:
        parser.error(f"no certs/ca.crt or keys/institution-N in {args.directory}")
    # JSON is YAML: one document per Secret, no YAML library needed.
    sys.stdout.write("".join(f"---\n{json.dumps(s, indent=2)}\n" for s in found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
