"""Record-level DP-SGD: per-sample gradients, clipping and noise (engine) and the ledger
(accountant). Nothing here imports Flower, so it can be tested and reused on its own."""
