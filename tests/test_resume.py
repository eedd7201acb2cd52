"""Resume after a kill: SIGKILL a real `tspin iterate` run (mid-iteration after a checkpoint, and at chosen moments
under the default save_steps: 0), `--resume` it, and reach exactly what an uninterrupted run reaches: weights,
evaluations, metrics.jsonl line for line, and no temporary leftovers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from _trainer_helpers import one_thread, task_file, tiny_model_dir  # noqa: F401 (one_thread: autouse fixture)
from safetensors.torch import load_file

from tspin.io import read_jsonl


def _cfg(tmp_path, model_dir, out, **overrides):
    cfg = dict(method="tspin", model_name_or_path=str(model_dir), data_path=str(tmp_path / "train.jsonl"),
               eval_data_path=str(tmp_path / "eval.jsonl"), num_iterations=2, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, learning_rate=1e-3, optimizer="adamw", max_length=40,
               max_prompt_length=24, max_new_tokens=6, generation_batch_size=16, eval_batch_size=16, save_steps=2,
               logging_steps=1, device="cpu", progress=False, output_dir=str(out), seed=3)
    cfg.update(overrides)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_path, *extra):
    cmd = [sys.executable, "-m", "tspin.cli", "iterate", "--config", str(cfg_path), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _train_rows(out):
    return {(r["iteration"], r["step"]): r for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "train"}


TIMING = {"tokens_per_s"}  # the only fields of a metric line that depend on the wall clock


def _lines(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out / "metrics.jsonl")]


def _leftovers(out):
    """What a kill leaves behind: hidden temp folders of atomic writes (.<name>.XXXXXXXX.tmp, .<name>.old) and
    generation's .partial files."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]


def _assert_same_run(ref_out, out):
    """Both iterations' weights bit-identical, metrics.jsonl equal line for line (but for timing), the same logged
    steps and losses, the same evaluations, no temporary leftovers; returns the train metric rows of each."""
    assert _lines(out) == _lines(ref_out)
    assert _leftovers(out) == []
    for t in (0, 1):
        a = load_file(str(ref_out / f"iter{t}" / "model" / "model.safetensors"))
        b = load_file(str(out / f"iter{t}" / "model" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = _train_rows(ref_out), _train_rows(out)
    assert sorted(ra) == sorted(rb)  # every step logged exactly once after the rewind
    for k in ra:
        assert ra[k]["loss"] == rb[k]["loss"]
    sa, sb = (json.loads((o / "summary.json").read_text())["evals"] for o in (ref_out, out))
    assert sa == sb
    return ra, rb


def test_killed_torchrun_fsdp2_run_resumes_like_uninterrupted(tmp_path):
    """The same under torchrun with 2 FSDP2 ranks: SIGKILL the whole job (launcher and ranks, as a preempted node
    loses them) mid-iteration, relaunch with --resume, and end where an uninterrupted 2-rank run ends."""
    model_dir = tiny_model_dir(tmp_path / "m", hidden=32, layers=1, heads=2)
    task_file(tmp_path / "train.jsonl", 24)
    task_file(tmp_path / "eval.jsonl", 4, seed=2)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"

    def launch(out_dir, *extra):
        path = _cfg(tmp_path, model_dir, out_dir, strategy="fsdp2", loss_impl="torch", per_device_train_batch_size=1)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tspin.cli", "iterate", "--config", str(path), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)  # its own process group: one killpg takes every rank

    ref = launch(ref_out)
    assert ref.wait(timeout=400) == 0, ref.stdout.read().decode()[-3000:]
    proc = launch(out)
    _wait_for(proc, out, "iteration 0 after a mid-iteration checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "iter0" / "model").exists()  # really killed mid-iteration

    resumed = launch(out, "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.stdout.read().decode()[-3000:]
    _assert_same_run(ref_out, out)


def _metric_rows(out):
    rows = []
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return rows


def _training(out, t):
    return not (out / f"iter{t}" / "model").exists() and any(
        r["phase"] == "train" and r["iteration"] == t for r in _metric_rows(out))


# Moments to kill a run at: name -> condition on OUT.
MOMENTS = {
    "proto generation": lambda out: (out / "proto.jsonl.partial").exists()
    and (out / "proto.jsonl.partial").read_text().count("\n") >= 1 and not (out / "proto.jsonl").exists(),
    "iteration 0 training, before any checkpoint": lambda out: _training(out, 0)
    and not (out / "iter0" / "checkpoints").exists(),
    "iteration 0 after a mid-iteration checkpoint": lambda out: not (out / "iter0" / "model").exists() and any(
        p.name >= "step-000004" for p in (out / "iter0" / "checkpoints").glob("step-*")),
    "between training and evaluation": lambda out: (out / "iter0" / "model").exists()
    and not (out / "iter0" / "eval.json").exists(),
    "iteration 1 training": lambda out: _training(out, 1),
}


def _wait_for(proc, out, moment):
    deadline = time.time() + 300
    while not MOMENTS[moment](out):
        assert proc.poll() is None, f"ended before {moment}: " + proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"never reached {moment}"
        time.sleep(0.002)


# (moment, save_steps of the launch killed there): save_steps may change on --resume (it does not change what is
# computed), so one chain covers the default save_steps: 0 and a resume from a mid-iteration checkpoint.
CHAIN = [("iteration 0 training, before any checkpoint", 0), ("iteration 0 after a mid-iteration checkpoint", 2),
         ("between training and evaluation", 0)]


@pytest.mark.parametrize("moments", [
    pytest.param(CHAIN, id="default"),
    pytest.param([("proto generation", 0), *CHAIN, ("iteration 1 training", 0)], id="all-moments",
                 marks=pytest.mark.slow),
])
def test_killed_at_chosen_moments_resumes_to_the_uninterrupted_metrics_line_for_line(tmp_path, moments):
    """One run killed at each moment in turn (each --resume goes on until the next kill), then resumed to the end:
    metrics.jsonl equals an uninterrupted run's line for line (the lines a killed iteration logged past the position
    it resumes from, its checkpoint or its start, are not left twice; no evaluation is logged twice), the weights and
    evaluations are bit-identical, and no temporary file is left."""
    model_dir = tiny_model_dir(tmp_path / "m", hidden=32, layers=1, heads=2)
    task_file(tmp_path / "train.jsonl", 24)  # 6 optimizer steps per iteration
    task_file(tmp_path / "eval.jsonl", 8, seed=2)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    small = dict(save_steps=0, generation_batch_size=4, eval_batch_size=2)
    ref = _run(_cfg(tmp_path, model_dir, ref_out, **small))
    for i, (moment, save_steps) in enumerate(moments):
        proc = _run(_cfg(tmp_path, model_dir, out, **{**small, "save_steps": save_steps}), *(["--resume"] if i else []))
        _wait_for(proc, out, moment)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert MOMENTS[moment](out), f"killed past {moment}"  # the kill landed at that moment
    resumed = _run(_cfg(tmp_path, model_dir, out, **small), "--resume")
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-2000:]
    assert ref.wait() == 0, ref.stdout.read().decode()[-2000:]
    ra, rb = _assert_same_run(ref_out, out)
    assert len(rb) == 12 and all(ra[k]["rewards/margins"] == rb[k]["rewards/margins"] for k in ra)
