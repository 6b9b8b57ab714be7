"""Drivers above the app: in-process federations for sweeps, audits and tests."""
