"""Checkpoints: save_pretrained weights + tokenizer + optimizer, scheduler, RNG states and the data position.

A checkpoint directory is complete or absent: it is written under a temp name and renamed into place.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path, atomic_write_json

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
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


def save_checkpoint(path: str | Path, model, tokenizer, *, optimizer=None, scheduler=None, step: int,
                    total_steps: int, extra: dict | None = None) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {"step": step, "total_steps": total_steps, "rng": rng_state(), **(extra or {})}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        torch.save(state, tmp / STATE_FILE)
        atomic_write_json(tmp / "progress.json", {"step": step, "total_steps": total_steps})
    return path


def load_trainer_state(path: str | Path, model, *, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load weights into `model` (in place) and the trainer state; returns the state dict (step, ...)."""
    from safetensors.torch import load_file

    path = Path(path)
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no model*.safetensors in checkpoint")
    sd = {}
    for s in shards:
        sd.update(load_file(str(s)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied LM heads are saved once; anything else missing means a different model
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings",
                                                                                    False))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


_STEP = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).exists()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    for _, p in list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)
