"""A run's output directory: tspin's own (a manifest marks it), never a run overwritten by mistake, its config and
what its inputs hold recorded, a resumed run checked to be the run that was started (same data, model and method),
and what a kill left behind cleaned.

Ownership: the first file tspin writes in a run directory is ``tspin-run.json``, the run manifest. tspin runs in a
directory that is missing, empty, or carries the manifest; it refuses any other non-empty directory unless told
``overwrite``, and then it only adds its own files beside what is there (refusing if any of the names a run writes
is taken). It cleans temp names of its own writer only, only in directories with the manifest and in the
sub-folders of its layout (``iter<t>/``, ``checkpoints/``), and ``overwrite`` of a run deletes only the entries of
the run layout (:func:`owned_by_run`), never another file in the directory.

A run's identity is what it computes from, not where things live: ``output_dir`` is not compared (a moved or
renamed run resumes), and the inputs named by a path or Hub id are compared by what they hold (``inputs.json``:
a digest of the loaded records, a fingerprint of the model and tokenizer files), so a moved data file or a path
spelled differently resumes, and a changed file is refused whatever its name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from .io import atomic_write_json, atomic_write_yaml, clean_stale_temps, read_json, temp_target
from .ranks import barrier, on_main

CONFIG_FILE = "config.yaml"
INPUTS_FILE = "inputs.json"
MANIFEST_FILE = "tspin-run.json"
# The entries a run writes at the top of its directory (train and iterate); a test checks every name a run writes.
_OWNED = re.compile(r"config\.yaml|inputs\.json|(metrics|phases)\.jsonl|summary\.json|train_summary\.json"
                    r"|eval(_init)?\.json|(proto|eval_generations|data_with_refs)\.jsonl(\.partial)?|model|checkpoints|iter\d+"
                    r"|nonfinite-step-\d+")
# The folders of the layout that hold atomic writes of their own (the cleaner walks these, nothing else).
RUN_SUBDIRS = re.compile(r"iter\d+|checkpoints")
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


def owned_by_run(name: str) -> bool:
    """Whether ``name``, an entry at the top of a run directory, is one a run writes there (or a temp of one)."""
    return name == MANIFEST_FILE or bool(_OWNED.fullmatch(temp_target(name) or name))


def read_manifest(out: Path) -> dict | None:
    """``out``'s run manifest, or None when it has none."""
    path = out / MANIFEST_FILE
    if not path.is_file():
        return None
    doc = read_json(path, "run manifest")
    if not isinstance(doc, dict) or doc.get("tspin_run") is not True:
        raise ValueError(f"{path}: not a tspin run manifest (expected a JSON object with \"tspin_run\": true); "
                         "delete it if this is not a tspin run directory")
    return doc


def write_manifest(out: Path) -> None:
    from . import __version__

    atomic_write_json(out / MANIFEST_FILE, {"tspin_run": True, "version": 1, "written_by": f"tspin {__version__}",
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run computed. A start that failed after recording its config leaves only
    the manifest, config.yaml and inputs.json (and maybe temp leftovers): such a directory is started afresh, with
    or without --resume, so that the corrected command runs."""
    if not out.is_dir():
        return False
    for p in out.iterdir():
        if p.name in (MANIFEST_FILE, CONFIG_FILE, INPUTS_FILE) or p.name.startswith(".") or not owned_by_run(p.name):
            continue
        if p.name == "metrics.jsonl" and p.stat().st_size == 0:
            continue
        return True
    return False


def check_same_config(config: dict, path: Path) -> None:
    """A resumed run must be the run that was started: refuse silent changes of data, model or method. ``config``:
    the run's settings, key -> value, as recorded in config.yaml."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())}); this record of the run is written by "
                         "tspin and was changed since: restore it, or start a new output_dir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(saved).__name__}; restore it, or "
                         "start a new output_dir")
    free = RESUME_FREE_KEYS | LOCATION_KEYS
    if (path.parent / INPUTS_FILE).exists():  # the inputs are compared by what they hold (check_same_inputs)
        free = free | set(INPUT_KEYS)
    diff = [k for k, v in config.items() if k not in free and k in saved and saved[k] != v]
    if diff:
        raise ValueError(f"--resume: config differs from {path} in " + ", ".join(
            f"{k} ({saved[k]!r} -> {config[k]!r})" for k in diff) + "; start a new output_dir instead")


def check_same_inputs(out: Path, inputs: dict) -> None:
    """The inputs of a resumed run hold what the recorded ones held (``inputs`` from :func:`input_fingerprints`)."""
    path = out / INPUTS_FILE
    if not path.exists():  # a run recorded before inputs.json existed: its paths were compared as written
        return
    saved = read_json(path, "record of the run's inputs")
    diff = [k for k in inputs if isinstance(saved, dict) and k in saved and saved[k] != inputs[k]]
    if diff:
        raise ValueError("--resume: " + ", ".join(f"{k} holds other contents than when the run started "
                                                  f"({_short(saved[k])} -> {_short(inputs[k])})" for k in diff)
                         + f" ({path}); start a new output_dir instead")


def _short(fp: dict | None) -> str:
    if not fp:
        return "none"
    return fp.get("hub_id") or f"{fp.get('kind', '')} sha256 {fp['sha256'][:12]}"


def open_run(config: dict, resume: bool, overwrite: bool = False) -> tuple[Path, bool]:
    """Checks before anything is loaded: a directory that can be written and is free for this run (missing, empty,
    tspin's own, or with ``overwrite`` one whose names do not clash), or on ``resume`` the run recorded there with
    the same config (``config``: the run's settings, key -> value; its ``output_dir`` is the directory). Returns
    (output dir, whether it holds a started run to continue)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one (continue the run, or start it afresh)")
    out = Path(config["output_dir"])
    check_output_dir(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return out, False
    if read_manifest(out) is None:
        _check_foreign(out, entries, overwrite)
        return out, False
    if overwrite:
        _check_inputs_outside(config, out)
        return out, False
    has_config, results = (out / CONFIG_FILE).exists(), holds_results(out)
    if results and not has_config:
        found = ", ".join(n for n in entries if owned_by_run(n) and n != MANIFEST_FILE and not n.startswith("."))
        raise FileExistsError(f"output_dir {out} holds results ({found}) but no {CONFIG_FILE}: the record of the "
                              "run that made them is gone, so they cannot be resumed or trusted; pass --overwrite to "
                              "start afresh there (tspin deletes what its runs write, nothing else) or choose "
                              "another output_dir")
    started = has_config and results
    if started and not resume:
        raise FileExistsError(f"output_dir {out} already holds a run ({CONFIG_FILE}); pass --resume to continue it, "
                              "--overwrite to start it afresh, or choose another output_dir")
    if started:
        check_same_config(config, out / CONFIG_FILE)
    return out, started


def _check_foreign(out: Path, entries: list[str], overwrite: bool) -> None:
    """A non-empty directory without the manifest: refused, or with ``overwrite`` used beside what it holds when
    none of its names is one a run writes."""
    if not overwrite:
        if CONFIG_FILE in entries:
            raise FileExistsError(
                f"output_dir {out} holds a run of an earlier tspin version ({CONFIG_FILE}, no {MANIFEST_FILE}): this "
                "tspin does not continue it (its trainer_state.pt files are pickles, which it no longer loads); "
                "choose another output_dir (its finished models, model/ or iter<t>/model/, load as "
                "model_name_or_path)")
        raise FileExistsError(f"output_dir {out} is not empty and is not a tspin run directory (no {MANIFEST_FILE}); "
                              "choose a new or empty directory, or pass --overwrite to run there beside its "
                              f"{len(entries)} entries (tspin deletes none of them)")
    clash = [n for n in entries if owned_by_run(n)]
    if clash:
        shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise FileExistsError(f"output_dir {out}: --overwrite: it holds {shown}, names a run writes, which tspin did "
                              f"not write there (no {MANIFEST_FILE}) and will neither delete nor reuse; move them "
                              "away or choose another output_dir")


def _check_inputs_outside(config: dict, out: Path) -> None:
    """--overwrite deletes the run's entries: none of the inputs may live in them (a model from iter2/model)."""
    doomed = [(out / n).resolve() for n in os.listdir(out) if owned_by_run(n) and n != MANIFEST_FILE]
    for key in INPUT_KEYS:
        value = config.get(key)
        if not value or not Path(value).expanduser().exists():
            continue
        p = Path(value).expanduser().resolve()
        hit = next((d for d in doomed if p == d or d in p.parents), None)
        if hit is not None:
            raise ValueError(f"config: {key}={value!r} lies in {hit}, which --overwrite would delete; copy it "
                             "elsewhere first or choose another output_dir")


def remove_run_entries(out: Path) -> list[str]:
    """Delete the entries of the run layout at the top of ``out`` (not the manifest, nothing else); their names."""
    removed = []
    for p in sorted(out.iterdir()):
        if p.name == MANIFEST_FILE or not owned_by_run(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def record_run(config: dict, out: Path, inputs: dict, overwrite: bool = False) -> None:
    """Once every rank has loaded everything: rank 0 writes the manifest first (a new directory), deletes the old
    run's entries (``overwrite``), removes what killed writes left, then writes OUT/config.yaml (``config``, key ->
    value) and OUT/inputs.json (every rank calls it)."""
    barrier()
    on_main(_record, config, out, inputs, overwrite)


def _record(config: dict, out: Path, inputs: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if read_manifest(out) is None:
        write_manifest(out)
    elif overwrite:
        remove_run_entries(out)
        write_manifest(out)
    clean_stale_temps(out, descend=RUN_SUBDIRS.fullmatch)
    atomic_write_yaml(out / CONFIG_FILE, config)
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


def input_fingerprints(*, model: str, tokenizer: str, proto_path: str | None, records: list[dict],
                       held: list[dict]) -> dict:
    """inputs.json: per input key, what it holds (the data as the loaded records, after subsetting; ``tokenizer``:
    the tokenizer's path or Hub id, the model's when the run names none)."""
    return {"model_name_or_path": source_fingerprint(model), "tokenizer_name_or_path": source_fingerprint(tokenizer),
            "data_path": records_digest(records), "eval_data_path": records_digest(held),
            "proto_path": source_fingerprint(proto_path)}
