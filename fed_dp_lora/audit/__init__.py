"""Empirical privacy audits of what the server sees (issue 12), all in this package:

- bounds.py: the one-run lower bound on epsilon (Steinke, Nasr and Jagielski) both audits use;
- canary.py: the input-canary audit of the final global adapter (`audit.enabled`), averaged
  over every client: it cannot see a leak in what one client sends in one round;
- release.py and dirac.py: the audit of ONE client's per-round releases, the adapters it sends,
  read by the server before aggregation as the adversary in our threat model reads them
  (`audit.release.enabled`).
Outside it, by what they are: the canary records a client trains on (data/canaries.py) and the
experiment that measures the audits' power (experiments/audit_power.py).

Design: Steinke, Nasr and Jagielski (NeurIPS 2023), "Privacy Auditing with One (1) Training
Run", in its white-box setting with Dirac gradient canaries (dirac.py, release.py). Chosen
over the random-direction canary updates of Andrew et al. (ICLR 2024, "One-shot empirical
privacy estimation for federated learning") because:
- the guarantee under test is per RECORD inside one client's DP-SGD. Andrew et al. insert
  canary CLIENTS and estimate the user-level epsilon of the server's aggregate; here a
  canary must be one more record, Poisson-sampled with rate q, so the test covers the
  subsampling, the noise and the accountant that the client claims;
- Steinke et al. give a lower bound at a stated confidence (bounds.py, tested);
  Andrew et al. give an estimate from a fitted Gaussian, which cannot prove a bug;
- a Dirac canary (norm exactly C on one coordinate) is the largest record the clip allows,
  and no two canaries share a coordinate, so no score carries another canary's signal. Random
  directions overlap by about C / sqrt(d) each: with hundreds of canaries in a LoRA adapter of
  a few ten thousand coordinates, that adds up to a noticeable fraction of C in every score.

What it does not test: clipping and the per-sample gradients (a canary's gradient is given,
not computed); the input-canary audit and the engine's tests cover those.
"""
