"""Every random number generator a run draws from (Python's ``random``, numpy's global generator, torch on the CPU
and on every CUDA device): seeded together from the run's seed and a position, and saved / restored together.

A run seeds them at each boundary its randomness depends on (the start of a command, of an iteration, of every
micro-batch of training), so what a micro-batch draws (dropout masks, a sampler's coins) is a function of
(seed, iteration, step, micro-batch, rank) alone: a run resumed from any point draws exactly what an
uninterrupted one drew there, whatever ran before in this process.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from non-negative integer keys (numpy's SeedSequence: nearby keys give unrelated seeds); one
    key is the seed itself (a run's plain seed seeds as torch.manual_seed(seed) always did)."""
    if len(keys) == 1:
        return int(keys[0])
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(*keys: int) -> int:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device) from ``keys``;
    returns the seed."""
    seed = derive_seed(*keys)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too (lazily, before CUDA starts)
    return seed


def rng_state() -> dict:
    """Every generator's state (Python tuples, a numpy array, uint8 tensors): what a checkpoint stores."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
