"""Checkpoints of the training policy: one format for one process, DDP and FSDP2, loadable at any rank count.

A checkpoint directory is a plain Hugging Face directory (``save_pretrained``: full weights as safetensors, or the
adapter of a LoRA run; + tokenizer) and, for a run to resume, the trainer state: the step, the optimizer state keyed
by parameter name, the LR scheduler, the RNG states and whatever the loop adds, in ``trainer_state/``: ``state.json``
(structure and numbers) + ``tensors.safetensors`` -- no pickle, so loading a checkpoint runs nothing from it
(:mod:`tspin.state_file`). The state dicts come from ``torch.distributed.checkpoint.state_dict``, which gathers
FSDP2 shards to rank 0 and scatters them back for this run's layout. A directory is complete or absent: it is
written under a temp name and renamed into place.

    save_checkpoint(path, policy, tokenizer=tok, optimizer=opt, scheduler=sched, state={"step": 10})
    state = load_checkpoint(path, policy, optimizer=opt, scheduler=sched)   # {"step": 10, ...}
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .io import atomic_path
from .ranks import barrier, is_main, world
from .rng import rng_state, set_rng_state
from .state_file import META_FILE, read_state, write_state
from .wrapping import policy_of, reshard, tied_head

STATE_DIR = "trainer_state"  # state.json + tensors.safetensors
STATE_FILE = f"{STATE_DIR}/{META_FILE}"
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle (tspin 0.1.0 and earlier): never loaded
_PREFIX = "model."  # CausalLMLogps keeps the Hugging Face model as .model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _broadcast() -> bool:
    """Under a process group, rank 0 alone reads a file and the values are broadcast (and re-sharded)."""
    return world()[1] > 1


# ----------------------------------------------------------------------------- state dicts
def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face model's full (unsharded) state dict on CPU, keyed as ``policy_of(model).model.state_dict()``
    (PEFT keys for a LoRA run). A collective under a process group: call it on every rank; the dict is complete on
    rank 0 and empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {k[len(_PREFIX):]: v for k, v in sd.items()}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on CPU: loadable at any rank count with
    :func:`load_optimizer_state_dict`. A collective under a process group; complete on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an :func:`optimizer_state_dict` (saved at any rank count) into this run's optimizer. Under a process
    group only rank 0 needs ``state`` (the others may pass ``{}``): it is broadcast and re-sharded."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not isinstance(state, dict):
        raise TypeError(f"state: expected the dict from optimizer_state_dict, got {type(state).__name__}")
    set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=_broadcast()))


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | Path, model: nn.Module, *, tokenizer=None, optimizer=None, scheduler=None,
                    state: dict | None = None) -> Path:
    """Write ``path``: the policy's weights as a Hugging Face directory (+ tokenizer), and the trainer state
    (``state`` + optimizer + scheduler + RNG states; ``trainer_state/``) when any of those
    is given. ``state`` holds JSON-like values (dicts, lists, tuples, numbers, strings, None) and tensors.

    ``model`` is the training policy (:func:`tspin.wrapping.wrap_model`: one process, DDP or FSDP2). Every rank
    calls it (gathering FSDP2 shards is a collective); rank 0 writes, then all ranks meet at a barrier.
    """
    path = Path(path)
    hf = policy_of(model).model
    sd = model_state_dict(model)
    if tied_head(model):  # the file a plain save_pretrained writes: a tied head is stored once
        sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}
    trainer = state is not None or optimizer is not None or scheduler is not None
    opt_sd = optimizer_state_dict(model, optimizer) if optimizer is not None else None
    if is_main():
        with atomic_path(path) as tmp:
            tmp.mkdir()
            hf.save_pretrained(tmp, state_dict=sd, safe_serialization=True)  # PEFT: the adapter only
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if trainer:
                full = {**(state or {}), "rng": rng_state()}
                if opt_sd is not None:
                    full["optimizer"] = opt_sd
                if scheduler is not None:
                    full["scheduler"] = scheduler.state_dict()
                write_state(tmp / STATE_DIR, full)
    barrier()
    return path


def load_checkpoint(path: str | Path, model: nn.Module, *, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Load a :func:`save_checkpoint` directory (or any ``save_pretrained`` directory of the same model) into the
    training policy in place, at any rank count, and the trainer state when the directory has one.

    Returns the saved ``state`` (``{}`` for a weights-only directory). Every rank calls it (a collective under a
    process group: rank 0 reads the weights, they are broadcast and re-sharded for this run's layout).
    """
    path = Path(path)
    _load_weights(path, model)
    if not (path / STATE_FILE).exists():
        if (path / LEGACY_STATE_FILE).exists():
            raise ValueError(f"{path / LEGACY_STATE_FILE}: a trainer state in the pickle format of tspin 0.1.0, which "
                             "tspin no longer loads (unpickling a file can run code from it); its weights load "
                             "with from_pretrained, its optimizer state cannot be resumed: start the run afresh")
        return {}
    state = read_state(path / STATE_DIR)
    if optimizer is not None and "optimizer" in state:
        load_optimizer_state_dict(model, optimizer, state.pop("optimizer"))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng", None)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return state


def _weight_files(path: Path, adapter: bool) -> list[Path]:
    files = sorted(path.glob("adapter_model*.safetensors" if adapter else "model*.safetensors"))
    if not files:
        kind = "adapter_model.safetensors (a LoRA run)" if adapter else "model*.safetensors"
        raise FileNotFoundError(f"{path}: no {kind} in checkpoint")
    return files


def _load_weights(path: Path, model: nn.Module) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    policy = policy_of(model)
    module_keys = list(policy.model.state_dict())  # names only: no gather under FSDP2
    adapter = hasattr(policy.model, "peft_config")
    files = _weight_files(path, adapter)
    # Every rank checks the names (file headers only), so a mismatch stops all of them alike, before any collective.
    if adapter:  # peft saves "...lora_A.weight" for the module's "...lora_A.default.weight"
        names = {k.replace(".default.", "."): k for k in module_keys if ".default." in k}
    else:
        names = {k: k for k in module_keys}
    in_file = {k for f in files for k in _safetensors_keys(f, safe_open)}
    unexpected = sorted(k for k in in_file if k not in names)
    tied = tied_head(model)
    # a LoRA checkpoint holds the adapter only; a tied LM head is saved once
    missing = [] if adapter else [k for k in names if k not in in_file and not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    sd = {}
    if is_main() or not _broadcast():
        sd = {_PREFIX + names[k]: v for f in files for k, v in _read_safetensors(f, load_file).items()}
    reshard(model)  # after a generate() the FSDP2 root holds temporary full tensors: load into the shards
    set_model_state_dict(model, sd, options=_options(broadcast_from_rank0=_broadcast(), strict=False))


def _damaged(f: Path, e: Exception) -> ValueError:
    return ValueError(f"{f}: not a complete safetensors file ({' '.join(str(e).split())}); the checkpoint is damaged "
                      f"(e.g. a copy cut short): delete {f.parent} to go back to an earlier checkpoint")


def _safetensors_keys(f: Path, safe_open) -> list[str]:
    from safetensors import SafetensorError

    try:
        with safe_open(str(f), "pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as e:
        raise _damaged(f, e) from None


def _read_safetensors(f: Path, load_file) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise _damaged(f, e) from None


# ----------------------------------------------------------------------------- mid-iteration checkpoints
_STEP = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    # a legacy pickled state is listed too, so that resuming from it stops with load_checkpoint's message
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))
             and ((p / STATE_FILE).exists() or (p / LEGACY_STATE_FILE).exists())]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints under ``root``. Rank 0 deletes, then a barrier (every rank calls it)."""
    if is_main():
        for _, p in list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root):
            shutil.rmtree(p, ignore_errors=True)
    barrier()
