"""Shared helpers for the trainer tests (test_data/losses_path/generation/train/cli/resume): a real tiny Llama and
tokenizer saved with save_pretrained, and real data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tspin.experiments.demo import build_model, build_tokenizer, make_task


def tiny_model_dir(path: Path, *, hidden: int = 32, layers: int = 1, heads: int = 2, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_model(tok, hidden=hidden, layers=layers, heads=heads, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_file(path: Path, n: int, seed: int = 1) -> Path:
    return write_jsonl(path, make_task(n, seed))


def tiny_run_inputs(d: Path, n: int = 12) -> Path:
    """`d` with a tiny model in d/model and `n` training records in d/data.jsonl (the command-line tests' inputs)."""
    tiny_model_dir(d / "model")
    task_file(d / "data.jsonl", n)
    return d


def tiny_policy(model_dir: Path):
    """The trainer's policy (CausalLMLogps, one process, CPU) around the model saved in `model_dir`."""
    from tspin.models import load_policy

    return load_policy(tiny_cfg(model_name_or_path=str(model_dir)))


def tiny_cfg(**kw):
    from tspin.experiments.demo import demo_config

    base = dict(max_new_tokens=6, eval_max_new_tokens=6, generation_batch_size=8, eval_batch_size=8,
                per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, progress=False)
    base.update(kw)
    return demo_config(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box spinning OpenMP workers cost
    seconds per generate() call; restore the setting for the other suites."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
