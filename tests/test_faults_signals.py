"""Faults that enter as signals: SIGTERM (a scheduler's stop, `kill`) is handled like SIGINT (Ctrl-C): one line on
stderr saying how to continue, exit 143 (130 for SIGINT), no traceback, nothing half-written, and the run resumes
to what an uninterrupted one computes. A worker pool (demo / study) stops its workers instead of waiting for their
jobs. Real processes, signalled at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _kill_resume import assert_same_run, launch, leftovers, metric_rows, write_cfg
from _trainer_helpers import one_thread, task_file, tiny_model_dir  # noqa: F401 (one_thread: autouse fixture)

from tspin.cli import main
from tspin.io import read_jsonl


def _signal_when(proc: subprocess.Popen, ready, sig: int, within: float = 120, cleanup=lambda: None) -> tuple[int, str]:
    """Send `sig` once `ready()` holds; (exit code, stdout+stderr) of a process that ends `within` seconds later
    (else `cleanup()` runs, the process is killed and the test fails)."""
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, "ended before the signal: " + proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "never got there"
        time.sleep(0.005)
    proc.send_signal(sig)
    deadline = time.time() + within
    while proc.poll() is None and time.time() < deadline:  # the commands print a few lines: no full pipe
        time.sleep(0.05)
    if proc.poll() is None:
        cleanup()  # e.g. children that hold the output pipe open
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running {within} s after the signal")
    return proc.returncode, proc.stdout.read().decode()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    return lines[-1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals")
    tiny_model_dir(d / "m")
    task_file(d / "train.jsonl", 24)
    task_file(d / "eval.jsonl", 4, seed=2)
    return d


def test_a_terminated_train_says_how_to_continue_and_resumes_to_the_uninterrupted_run(inputs, tmp_path):
    settings = dict(method="sft", save_steps=2, eval_batch_size=4, data_path=str(inputs / "train.jsonl"),
                    eval_data_path=str(inputs / "eval.jsonl"))
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref = launch(write_cfg(tmp_path, inputs / "m", ref_out, **settings), command="train")
    proc = launch(write_cfg(tmp_path, inputs / "m", out, **settings), command="train")
    rc, text = _signal_when(proc, lambda: any(r["phase"] == "train" and r["step"] >= 3 for r in metric_rows(out)),
                            signal.SIGTERM)
    assert rc == 143
    assert _last_line(text) == "tspin train: terminated (SIGTERM); run the same command with --resume to continue"
    assert not (out / "model").exists()  # stopped mid-training
    resumed = launch(write_cfg(tmp_path, inputs / "m", out, **settings), "--resume", command="train")
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-2000:]
    assert ref.wait() == 0, ref.stdout.read().decode()[-2000:]
    assert_same_run(ref_out, out, models=("model",))


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_generate_continues_where_it_stopped(inputs, tmp_path, sig, code, word):
    """SIGTERM or SIGINT mid-generation: the exit code and the message; the same command finishes, with exactly the
    samples of an uninterrupted run."""
    common = (f"--model_name_or_path={inputs / 'm'} --data_path={inputs / 'train.jsonl'} --max_length=40 "
              "--max_prompt_length=24 --max_new_tokens=6 --progress=false --device=cpu --generation_batch_size=1")
    out = tmp_path / "g.jsonl"
    cmd = [sys.executable, "-m", "tspin.cli", "generate", *common.split(), f"--out={out}"]
    # SIGINT at its default in the child, as a terminal's Ctrl-C finds it: a test run started in the background
    # (`make test &`) ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "g.jsonl.partial"
    rc, text = _signal_when(proc, lambda: partial.exists() and partial.read_text().count("\n") >= 2, sig)
    assert rc == code
    assert _last_line(text) == f"tspin generate: {word}; run the same command again to continue"
    assert not out.exists() and partial.exists()
    assert main([*cmd[3:]]) == 0
    assert main(["generate", *common.split(), f"--out={tmp_path / 'ref.jsonl'}"]) == 0
    assert read_jsonl(out) == read_jsonl(tmp_path / "ref.jsonl")
    assert leftovers(tmp_path) == []


NAPPER = """
import os, time
from pathlib import Path


def nap(seconds, pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {}
"""

POOL = """
import signal, sys, time
from pathlib import Path
from tspin.cli import _raise_terminated
from tspin.experiments.jobs import Job, run_jobs

root = Path(sys.argv[1])
signal.signal(signal.SIGTERM, _raise_terminated)
jobs = [Job(n, "napper:nap", root / n, {"seconds": 300, "pid_file": str(root / f"{n}.pid")}) for n in ("a", "b")]
t0 = time.time()
try:
    run_jobs(jobs, processes=2)
except KeyboardInterrupt as e:
    print(f"stopped by {type(e).__name__} after {time.time() - t0:.0f} s", flush=True)
    sys.exit(143)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_sigterm_to_a_worker_pool_stops_its_workers_instead_of_waiting(tmp_path):
    """The demo's and study's pool (tspin.experiments.jobs.run_jobs, 2 spawned workers on 5-minute jobs): a SIGTERM
    to the parent alone (Ctrl-C would reach the workers too) ends it within seconds and the workers with it."""
    (tmp_path / "napper.py").write_text(NAPPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", POOL, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    pids = [tmp_path / "a.pid", tmp_path / "b.pid"]

    def kill_workers():  # a failing run leaves no sleeper behind
        for p in pids:
            if p.exists() and p.read_text() and _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)

    try:
        rc, text = _signal_when(proc, lambda: all(p.exists() and p.read_text() for p in pids), signal.SIGTERM,
                                within=60, cleanup=kill_workers)  # not the 5 minutes the jobs would take
        assert rc == 143 and "stopped by Terminated" in text, text
        workers = [int(p.read_text()) for p in pids]
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        kill_workers()
