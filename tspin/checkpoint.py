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
from .ranks import barrier, is_main

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
    """`model`: the training policy (plain HF model, CausalLMLogps, DDP or FSDP2; PEFT saves its adapter only).

    Every rank calls it (under FSDP2 gathering the full weights and optimizer state is a collective); rank 0
    writes the directory, then all ranks meet at a barrier. The weights are a plain HF / PEFT directory, so an
    iteration's model loads with from_pretrained at any rank count.
    """
    from .distributed import full_optimizer_state_dict, full_state_dict, hf_model_of

    path = Path(path)
    sharded = _is_sharded(model)
    sd = full_state_dict(model) if sharded else None
    if sd is not None and _tied(model):  # the file a plain save_pretrained writes: a tied head is stored once
        sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}
    opt_sd = None
    if optimizer is not None:  # FSDP2 shards are keyed by name and gathered; otherwise torch's own (exact) format
        opt_sd = full_optimizer_state_dict(model, optimizer) if sharded else optimizer.state_dict()
    if is_main():
        with atomic_path(path) as tmp:
            tmp.mkdir()
            hf = hf_model_of(model)
            hf.save_pretrained(tmp, safe_serialization=True, **({"state_dict": sd} if sd is not None else {}))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            state = {"step": step, "total_steps": total_steps, "rng": rng_state(), **(extra or {})}
            if opt_sd is not None:
                state["optimizer"] = opt_sd
                state["optimizer_format"] = "full" if sharded else "torch"
            if scheduler is not None:
                state["scheduler"] = scheduler.state_dict()
            torch.save(state, tmp / STATE_FILE)
            atomic_write_json(tmp / "progress.json", {"step": step, "total_steps": total_steps})
    barrier()
    return path


def _tied(model) -> bool:
    from tspin_kernels.integrations import unwrap_causal_lm

    return bool(getattr(unwrap_causal_lm(model).config, "tie_word_embeddings", False))


def _is_sharded(model) -> bool:
    from .distributed import _is_fsdp

    return _is_fsdp(getattr(model, "module", model))


def _read_weights(path: Path, adapter: bool) -> dict:
    from safetensors.torch import load_file

    shards = sorted(path.glob("adapter_model*.safetensors" if adapter else "model*.safetensors"))
    if not shards:
        kind = "adapter_model.safetensors (a LoRA run)" if adapter else "model*.safetensors"
        raise FileNotFoundError(f"{path}: no {kind} in checkpoint")
    sd = {}
    for s in shards:
        sd.update(load_file(str(s)))
    return sd


def load_weights(path: str | Path, model) -> None:
    """Load a save_checkpoint directory into the training policy in place (plain, DDP or FSDP2; PEFT: adapter)."""
    from tspin_kernels.integrations import CausalLMLogps

    from .distributed import hf_model_of

    path = Path(path)
    hf = hf_model_of(model)
    adapter = hasattr(hf, "peft_config")
    sd = _read_weights(path, adapter)
    target = getattr(model, "module", model)
    prefix = "model." if isinstance(target, CausalLMLogps) else ""
    if adapter:  # peft saves "...lora_A.weight" for the module's "...lora_A.default.weight"
        names = {k.replace(".default.", "."): k for k in hf.state_dict() if ".default." in k}
        unknown = [k for k in sd if k not in names]
        if unknown:
            raise ValueError(f"{path}: adapter does not match the model's LoRA layers (unexpected {unknown[:3]})")
        sd = {names[k]: v for k, v in sd.items()}
    full = {prefix + k: v for k, v in sd.items()}
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from .distributed import reshard

        reshard(target)  # after a generate() the root holds temporary full tensors: load into the shards

        missing, unexpected = set_model_state_dict(target, full, options=StateDictOptions(full_state_dict=True,
                                                                                           strict=False))
    else:
        missing, unexpected = target.load_state_dict(full, strict=False)
    tied = _tied(hf)
    # tied LM heads are saved once; a LoRA checkpoint holds the adapter only; anything else is a different model
    missing = [] if adapter else [k for k in missing if not (k.endswith("lm_head.weight") and tied)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")


def load_trainer_state(path: str | Path, model, *, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load weights into `model` (in place) and the trainer state; returns the state dict (step, ...).
    Every rank calls it (a collective under FSDP2)."""
    path = Path(path)
    load_weights(path, model)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None and "optimizer" in state:
        if state.get("optimizer_format") == "full":
            from .distributed import load_optimizer_state_dict

            load_optimizer_state_dict(model, optimizer, state["optimizer"])
        else:
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
    """Rank 0 deletes, then a barrier (every rank calls it)."""
    if is_main():
        _prune(root, keep)
    barrier()


def _prune(root: str | Path, keep: int) -> None:
    for _, p in list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)
