"""A run's output directory: refuse to overwrite a run, record its config and what its inputs hold, check that a
resumed run is the run that was started (same data, model and method), and clean what a kill left behind.

A run's identity is what it computes from, not where things live: ``output_dir`` is not compared (a moved or
renamed run resumes), and the inputs named by a path or Hub id are compared by what they hold (``inputs.json``:
a digest of the loaded records, a fingerprint of the model and tokenizer files), so a moved data file or a path
spelled differently resumes, and a changed file is refused whatever its name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import tempfile
from pathlib import Path

import yaml

from .config import Config, save_config
from .io import atomic_write_json, clean_stale_temps
from .ranks import barrier, on_main

CONFIG_FILE = "config.yaml"
INPUTS_FILE = "inputs.json"
# Keys a resumed run may change: they alter how the run is shown, saved or how far it goes, not what it computes.
# The generation backend too: files already sampled are kept, the rest is sampled by the backend now configured.
RESUME_FREE_KEYS = {"progress", "device", "logging_steps", "save_steps", "save_total_limit", "num_iterations",
                    "eval_batch_size", "generation_batch_size", "generation_backend", "vllm_gpu_memory_utilization"}
# Where the run lives: not part of its identity.
LOCATION_KEYS = {"output_dir"}
# Inputs named by a path or Hub id: compared through inputs.json (what they hold), not by how they are spelled.
INPUT_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "data_path", "eval_data_path", "proto_path")
# Files of a model or tokenizer directory that make it what it is (not a README or a download cache).
_MODEL_FILES = {".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".jinja"}
_WHOLE = 64 * 2**20  # files up to this size are hashed whole; larger ones (weights) by 16 evenly spaced chunks
_CHUNK, _CHUNKS = 2**16, 16


def check_output_dir(out: Path, label: str | None = None) -> None:
    """Fail before anything is loaded when directory ``out`` cannot be made and written: under a file, or not
    writable. ``label`` names it in the message (default: the output_dir key)."""
    label = label or f"config: output_dir={str(out)!r}"
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{label}: {parent} is a file, not a directory")
    try:  # a real probe (an unnamed temp file): permission bits say nothing for root, nor about read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{label}: cannot write in {parent}: {e.strerror}") from e


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run computed. A start that failed after recording its config leaves only
    config.yaml / inputs.json (and maybe temp leftovers): such a directory is started afresh, with or without
    --resume, so that the corrected command runs."""
    if not out.is_dir():
        return False
    for p in out.iterdir():
        if p.name in (CONFIG_FILE, INPUTS_FILE) or p.name.startswith("."):
            continue
        if p.name == "metrics.jsonl" and p.stat().st_size == 0:
            continue
        return True
    return False


def check_same_config(cfg: Config, path: Path) -> None:
    """A resumed run must be the run that was started: refuse silent changes of data, model or method."""
    saved = yaml.safe_load(path.read_text()) or {}
    free = RESUME_FREE_KEYS | LOCATION_KEYS
    if (path.parent / INPUTS_FILE).exists():  # the inputs are compared by what they hold (check_same_inputs)
        free = free | set(INPUT_KEYS)
    diff = [k for k, v in cfg.to_dict().items() if k not in free and k in saved and saved[k] != v]
    if diff:
        raise ValueError(f"--resume: config differs from {path} in " + ", ".join(
            f"{k} ({saved[k]!r} -> {getattr(cfg, k)!r})" for k in diff) + "; start a new output_dir instead")


def check_same_inputs(out: Path, inputs: dict) -> None:
    """The inputs of a resumed run hold what the recorded ones held (``inputs`` from :func:`input_fingerprints`)."""
    path = out / INPUTS_FILE
    if not path.exists():  # a run recorded before inputs.json existed: its paths were compared as written
        return
    saved = json.loads(path.read_text())
    diff = [k for k in inputs if k in saved and saved[k] != inputs[k]]
    if diff:
        raise ValueError("--resume: " + ", ".join(f"{k} holds other contents than when the run started "
                                                  f"({_short(saved[k])} -> {_short(inputs[k])})" for k in diff)
                         + f" ({path}); start a new output_dir instead")


def _short(fp: dict | None) -> str:
    if not fp:
        return "none"
    return fp.get("hub_id") or f"{fp.get('kind', '')} sha256 {fp['sha256'][:12]}"


def open_run(cfg: Config, resume: bool) -> tuple[Path, bool]:
    """Checks before anything is loaded: a directory that can be written, fresh, or on --resume the run recorded
    there with the same config. Returns (output dir, whether it holds a started run to continue)."""
    out = Path(cfg.output_dir)
    check_output_dir(out)
    started = (out / CONFIG_FILE).exists() and holds_results(out)
    if started and not resume:
        raise FileExistsError(f"output_dir {out} already holds a run ({CONFIG_FILE}); pass --resume to continue it "
                              "or choose another output_dir")
    if started:
        check_same_config(cfg, out / CONFIG_FILE)
    return out, started


def record_run(cfg: Config, out: Path, inputs: dict) -> None:
    """Once every rank has loaded everything: rank 0 removes what killed writes left, then writes OUT/config.yaml
    and OUT/inputs.json (every rank calls it)."""
    barrier()
    on_main(_record, cfg, out, inputs)


def _record(cfg: Config, out: Path, inputs: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    save_config(cfg, out / CONFIG_FILE)
    atomic_write_json(out / INPUTS_FILE, inputs)


# ----------------------------------------------------------------------------- fingerprints
def records_digest(records: list[dict]) -> dict:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return {"kind": "records", "count": len(records), "sha256": h.hexdigest()}


def source_fingerprint(value: str | None) -> dict | None:
    """What a model / tokenizer / file path holds: the names, sizes and contents of its files (weights larger than
    64 MiB by 16 evenly spaced 64 KiB chunks, enough to tell two fine-tunes apart without reading gigabytes); a
    name that is not a local path is a Hub id and stands for itself."""
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.exists():
        return {"hub_id": value}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _MODEL_FILES
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else ''}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE:
                h.update(fh.read())
            else:
                for i in range(_CHUNKS):
                    fh.seek((size - _CHUNK) * i // (_CHUNKS - 1))
                    h.update(fh.read(_CHUNK))
    return {"kind": "file" if p.is_file() else "dir", "files": len(files), "sha256": h.hexdigest()}


def input_fingerprints(cfg: Config, records: list[dict], held: list[dict]) -> dict:
    """inputs.json: per input key, what it holds (the data as the loaded records, after subsetting)."""
    return {"model_name_or_path": source_fingerprint(cfg.model_name_or_path),
            "tokenizer_name_or_path": source_fingerprint(cfg.tokenizer_name_or_path or cfg.model_name_or_path),
            "data_path": records_digest(records), "eval_data_path": records_digest(held),
            "proto_path": source_fingerprint(cfg.proto_path)}
