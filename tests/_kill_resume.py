"""The kill-and-resume machinery of the resume tests: real `tspin iterate` / `tspin train` processes launched from
a YAML recipe, SIGKILLed at chosen moments (conditions on what OUT holds), resumed, and compared with an
uninterrupted run: metrics.jsonl line for line (but for timing), weights bit for bit, the same evaluations and no
temporary leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tspin.io import read_jsonl


def write_cfg(tmp_path: Path, model_dir: Path, out: Path, **overrides) -> Path:
    """A recipe for the tiny runs (tspin, 2 iterations, 6 optimizer steps per iteration on 24 records)."""
    cfg = dict(method="tspin", model_name_or_path=str(model_dir), data_path=str(tmp_path / "train.jsonl"),
               eval_data_path=str(tmp_path / "eval.jsonl"), num_iterations=2, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, learning_rate=1e-3, optimizer="adamw", max_length=40,
               max_prompt_length=24, max_new_tokens=6, generation_batch_size=16, eval_batch_size=16, save_steps=2,
               logging_steps=1, device="cpu", progress=False, output_dir=str(out), seed=3)
    cfg.update(overrides)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cfg_path: Path, *extra: str, command: str = "iterate") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tspin.cli", command, "--config", str(cfg_path), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_rows(out: Path) -> dict:
    return {(r["iteration"], r["step"]): r for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "train"}


TIMING = {"tokens_per_s"}  # the only fields of a metric line that depend on the wall clock


def lines(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out / "metrics.jsonl")]


def leftovers(out: Path) -> list[Path]:
    """What a kill leaves behind: hidden temp folders of atomic writes (.<name>.tspin-XXXXXXXX.tmp,
    .<name>.tspin-old) and generation's .partial files."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]


def assert_same_run(ref_out: Path, out: Path, models=("iter0/model", "iter1/model")) -> tuple[dict, dict]:
    """The `models` weights bit-identical, metrics.jsonl equal line for line (but for timing), the same logged
    steps and losses, the same evaluations, no temporary leftovers; returns the train metric rows of each."""
    assert lines(out) == lines(ref_out)
    assert leftovers(out) == []
    for m in models:
        a = load_file(str(ref_out / m / "model.safetensors"))
        b = load_file(str(out / m / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = train_rows(ref_out), train_rows(out)
    assert sorted(ra) == sorted(rb)  # every step logged exactly once after the rewind
    for k in ra:
        assert ra[k]["loss"] == rb[k]["loss"]
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (ref_out, out))
    assert sa.get("evals") == sb.get("evals") and {k: v for k, v in sa.items() if k.startswith("eval/")} == {
        k: v for k, v in sb.items() if k.startswith("eval/")}
    return ra, rb


def metric_rows(out: Path) -> list[dict]:
    rows = []
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return rows


def training(out: Path, t: int, run: str | None = None) -> bool:
    """Iteration t (or, `run` given, the `train` run in OUT/run) is training: a metric line, no final model yet."""
    where = out / (f"iter{t}" if run is None else run)
    return not (where / "model").exists() and any(r["phase"] == "train" and r["iteration"] == t
                                                  for r in metric_rows(out))


def _checkpointed(where: Path) -> bool:
    return not (where / "model").exists() and any(p.name >= "step-000004"
                                                  for p in (where / "checkpoints").glob("step-*"))


# Moments to kill a run at: name -> condition on OUT (`iterate`; the "train ..." ones: `tspin train`).
MOMENTS = {
    "proto generation": lambda out: (out / "proto.jsonl.partial").exists()
    and (out / "proto.jsonl.partial").read_text().count("\n") >= 1 and not (out / "proto.jsonl").exists(),
    "iteration 0 training, before any checkpoint": lambda out: training(out, 0)
    and not (out / "iter0" / "checkpoints").exists(),
    "iteration 0 after a mid-iteration checkpoint": lambda out: _checkpointed(out / "iter0"),
    "between training and evaluation": lambda out: (out / "iter0" / "model").exists()
    and not (out / "iter0" / "eval.json").exists(),
    "iteration 1 training": lambda out: training(out, 1),
    "train, before any checkpoint": lambda out: training(out, 0, run=".") and not (out / "checkpoints").exists(),
    "train, after a mid-run checkpoint": lambda out: _checkpointed(out),
}


def wait_for(proc: subprocess.Popen, out: Path, moment: str) -> None:
    deadline = time.time() + 900  # generous: a loaded 2-core machine runs torchrun ranks several times slower
    while not MOMENTS[moment](out):
        assert proc.poll() is None, f"ended before {moment}: " + proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"never reached {moment}"
        time.sleep(0.002)


def kill_at(proc: subprocess.Popen, out: Path, moment: str) -> None:
    """SIGKILL `proc` once OUT shows `moment`, and check the kill landed there."""
    wait_for(proc, out, moment)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert MOMENTS[moment](out), f"killed past {moment}"
