"""Host syncs in the training loop: one read per optimizer step, none per micro-batch.

That one read is the guard against a diverged step: whether the step's loss and gradient norm are finite must be
known on the host before ``optimizer.step()``, so that a non-finite update never reaches the weights (tspin/train.py
says why this beats a device-side skip). At a logged step the metrics ride on that same read; between two logged
steps they stay on the device. On a GPU one sync per optimizer step, after a whole accumulation window, costs little
next to the step itself; a sync per micro-batch or per metric would stall the stream far more often.

On a GPU every read of a device value (``.item()``, ``.tolist()``, ``.cpu()``, ``float(t)``, ``bool(t)``, ...) waits
for the stream to drain. On the CPU there is nothing to wait for, so the test counts the reads themselves: it
wraps those ``torch.Tensor`` methods while ``train_loop`` runs and records the calls made from the trainer's own
code (``tspin/``) and from the kernels it calls (``tspin_kernels/``, which the trainer calls with
``validate=False``: ``tspin.batch.collate`` has checked the batch on the CPU). Reads inside torch and transformers
are theirs. The kernels' one unavoidable sync, the ``nonzero`` that compacts counted positions, is an operator,
not a read: tests/test_host_syncs.py counts it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import one_thread, tiny_cfg, tiny_model_dir, tiny_policy  # noqa: F401 (one_thread: autouse)

import tspin
import tspin_kernels
from tspin.data import build_features
from tspin.experiments.demo import make_task
from tspin.io import read_jsonl
from tspin.metrics import MetricsWriter
from tspin.models import load_tokenizer
from tspin.settings import train_settings
from tspin.train import train_loop

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
OURS = (Path(tspin.__file__).resolve().parent, Path(tspin_kernels.__file__).resolve().parent)
# Functions whose tensors live on the CPU by construction (on a GPU run too), so their reads cost no sync:
# the data order is a CPU generator's permutation, computed once before the first step.
HOST_ONLY = {"epoch_order"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"), hidden=32, layers=1, heads=2)


@pytest.fixture
def host_reads(monkeypatch):
    """Patch the Tensor read methods; returns the (file:line function, method) reads from tspin/ and tspin_kernels/."""
    calls: list[str] = []

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if any(path.is_relative_to(d) for d in OURS) and caller.f_code.co_name not in HOST_ONLY:
                calls.append(f"{path.name}:{caller.f_lineno} {caller.f_code.co_name} .{name}")
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return calls


def _features(tok, method: str, n: int = 12) -> list[dict]:
    fields = {"tspin": ("real", "generated", "proto"), "spin": ("real", "generated"), "sft": ("real",)}[method]
    recs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"],
             "generated": r["response"][1:], "proto": r["response"][::-1]} for r in make_task(n, 4)]
    feats = build_features(recs, tok, fields, template="paper", max_length=40, max_prompt_length=24)
    if method == "spin":
        for i, f in enumerate(feats):
            f["ref"] = {"real": -1.0 - i, "generated": -2.0 - i}
    return feats


@pytest.mark.parametrize("method, layout, fused_loss", [
    ("tspin", "padded", "true"), ("tspin", "padded", "false"), ("spin", "packed", "true"),
    ("tspin", "shared_prefix", "true"), ("sft", "padded", "auto")])
def test_one_host_read_per_optimizer_step(model_dir, tmp_path, host_reads, method, layout, fused_loss):
    """The fused loss path plans its chunks from the counts collate took on the CPU: no read of its own."""
    tok = load_tokenizer(str(model_dir))
    # 12 examples, 2 per micro-batch, 2 micro-batches per step: 3 steps per epoch, 6 steps, a line every 3rd
    cfg = tiny_cfg(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2.0,
                   logging_steps=3, layout=layout, loss_impl="torch", fused_loss=fused_loss)
    train_loop(tiny_policy(model_dir), tok, _features(tok, method), train_settings(cfg), method=method,
               out_dir=tmp_path / "run", metrics=MetricsWriter(tmp_path / "metrics.jsonl"))
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [3, 6] and all("loss" in r and "grad_norm" in r for r in lines)
    # one read per optimizer step (6; 12 micro-batches), the logged steps' metrics within it, and one for the
    # end-of-iteration summary (train_summary.json)
    assert len(host_reads) <= 6 + 1, "\n".join(host_reads)
    metric_reads = [r for r in host_reads if "read_back" in r]
    assert len(metric_reads) == len(lines) + 1, "\n".join(host_reads)  # the metrics: once per line, + the summary
