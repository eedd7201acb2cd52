"""A run's output directory: refuse to overwrite a run, record its config, and check that a resumed run is the
run that was started (same data, model and method)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import Config, save_config
from .ranks import barrier, on_main

CONFIG_FILE = "config.yaml"
# Keys a resumed run may change: they alter how the run is shown, saved or how far it goes, not what it computes.
RESUME_FREE_KEYS = {"progress", "device", "logging_steps", "save_steps", "save_total_limit", "num_iterations",
                    "eval_batch_size", "generation_batch_size"}


def check_fresh(out: Path, resume: bool, marker: str = CONFIG_FILE) -> None:
    if (out / marker).exists() and not resume:
        raise FileExistsError(f"output_dir {out} already holds a run ({marker}); pass --resume to continue it or "
                              "choose another output_dir")


def check_same_config(cfg: Config, path: Path) -> None:
    """A resumed run must be the run that was started: refuse silent changes of data, model or method."""
    saved = yaml.safe_load(path.read_text()) or {}
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS and k in saved and saved[k] != v]
    if diff:
        raise ValueError(f"--resume: config differs from {path} in " + ", ".join(
            f"{k} ({saved[k]!r} -> {getattr(cfg, k)!r})" for k in diff) + "; start a new output_dir instead")


def open_run(cfg: Config, resume: bool) -> Path:
    """Checks before anything is loaded: a fresh directory, or on --resume the same config as the one recorded."""
    out = Path(cfg.output_dir)
    check_fresh(out, resume)
    if resume and (out / CONFIG_FILE).exists():
        check_same_config(cfg, out / CONFIG_FILE)
    return out


def record_config(cfg: Config, out: Path) -> None:
    """Rank 0 writes OUT/config.yaml once every rank has checked the directory (every rank calls it)."""
    barrier()
    on_main(_write_config, cfg, out)


def _write_config(cfg: Config, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)
