"""Deployment tooling: the institution's warm launcher and app check, the operator's run wrapper."""
