"""The launcher's forked tasks behave like fresh processes where it matters: random streams."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from fed_dp_lora.deploy.flower_runtime import fresh_process_rng


def draws_in_forked_children(reseed: bool, children: int = 3) -> list[list[float]]:
    """What each forked child draws from the global generators (Python, numpy, torch)."""
    torch.rand(1), np.random.rand()  # the parent's generators are in some state before the fork
    out = []
    for _ in range(children):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            if reseed:
                fresh_process_rng()
            os.write(write, json.dumps([random.random(), float(np.random.rand()), float(torch.rand(1))]).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            out.append(json.loads(pipe.read()))
        os.waitpid(pid, 0)
    return out


def test_forked_children_share_numpy_and_torch_streams_unless_reseeded():
    shared = draws_in_forked_children(reseed=False)
    assert len({d[0] for d in shared}) == 3  # CPython reseeds `random` at fork by itself
    assert len({d[1] for d in shared}) == 1 and len({d[2] for d in shared}) == 1  # the trap
    fresh = draws_in_forked_children(reseed=True)
    assert all(len({d[i] for d in fresh}) == 3 for i in range(3))
