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


def tiny_policy(model_dir: Path, **kw):
    """The trainer's policy (CausalLMLogps, one process, CPU) around the model saved in `model_dir`; `kw`: config
    keys (lora_rank=2, ...)."""
    from tspin.models import load_policy
    from tspin.settings import load_settings

    return load_policy(load_settings(tiny_cfg(model_name_or_path=str(model_dir), **kw)))


def tiny_cfg(**kw):
    from tspin.experiments.demo import demo_config

    base = dict(max_new_tokens=6, eval_max_new_tokens=6, generation_batch_size=8, eval_batch_size=8,
                per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, progress=False)
    base.update(kw)
    return demo_config(**base)


def assert_trains_alike(tok, feats, cfgs: dict, *, method: str, out: Path, keys=None) -> None:
    """A fresh policy per config of ``cfgs`` (name -> Config) trained on ``feats``, the same data and steps: the
    final trainable weights and the logged numbers (``keys``, default every float but the throughput) agree with
    the first config's."""
    from tspin.io import read_jsonl
    from tspin.metrics import MetricsWriter
    from tspin.models import load_policy
    from tspin.settings import load_settings, train_settings
    from tspin.train import train_loop

    finals, logs = [], []
    for name, cfg in cfgs.items():
        torch.manual_seed(0)  # the same LoRA init for every run
        model = load_policy(load_settings(cfg))
        train_loop(model, tok, feats, train_settings(cfg), method=method, out_dir=out / name, iteration=1,
                   metrics=MetricsWriter(out / f"{name}.jsonl"))
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        logs.append(read_jsonl(out / f"{name}.jsonl"))
    for final, log in zip(finals[1:], logs[1:]):
        for n in finals[0]:
            torch.testing.assert_close(final[n], finals[0][n], rtol=1e-3, atol=1e-4,
                                       msg=lambda m, n=n: f"{n}: {m}")  # Adam amplifies fp noise near 0
        assert len(log) == len(logs[0]) > 0
        for a, b in zip(logs[0], log):
            for key in keys or [k for k, v in a.items() if isinstance(v, float) and k != "tokens_per_s"]:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box spinning OpenMP workers cost
    seconds per generate() call; restore the setting for the other suites."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` (hidden ones included, links not followed): a file's bytes, 'dir', or the link's
    target; compare two snapshots to show nothing there changed."""
    out: dict[str, bytes | str] = {}
    for p in sorted(Path(root).rglob("*")):
        key = p.relative_to(root).as_posix()
        out[key] = f"link -> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def one_clear_line(err: str, fragment: str) -> str:
    """stderr of a failed command: one line, `tspin <command>: error: ...` holding `fragment`, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and lines[0].startswith("tspin"), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


class Plant:
    """Unpickling this creates the file `marker`: what a crafted pickle could do with any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file that runs code when loaded with weights_only=False (checked here: it does; the marker is
    removed again before the caller hands the file to tspin)."""
    torch.save({"step": 1, "payload": Plant(marker)}, path)
    torch.load(path, weights_only=False)
    assert Path(marker).exists()
    Path(marker).unlink()
    return path


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: a space becomes part of the next word, "▁dcba"), trained here on
    the demo's texts with `tokenizers`: like Mistral's / Zephyr's, a response joined to a prompt that ends in a
    space is not tokenized like the response alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tspin.data import format_prompt

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = [format_prompt(None, r["prompt"], "paper") + r["response"] for r in make_task(400, 7)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>",
                                                                                        "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
