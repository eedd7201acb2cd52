"""Resume after a kill: SIGKILL a real `tspin iterate` run (mid-iteration after a checkpoint, and at chosen moments
under the default save_steps: 0), `--resume` it, and reach exactly what an uninterrupted run reaches: weights,
evaluations, metrics.jsonl line for line, and no temporary leftovers."""

import os
import signal
import subprocess
import sys

import pytest
from _kill_resume import assert_same_run, kill_at, launch, wait_for, write_cfg
from _trainer_helpers import one_thread, task_file, tiny_model_dir  # noqa: F401 (one_thread: autouse fixture)


def test_killed_torchrun_fsdp2_run_resumes_like_uninterrupted(tmp_path):
    """The same under torchrun with 2 FSDP2 ranks: SIGKILL the whole job (launcher and ranks, as a preempted node
    loses them) mid-iteration, relaunch with --resume, and end where an uninterrupted 2-rank run ends."""
    model_dir = tiny_model_dir(tmp_path / "m", hidden=32, layers=1, heads=2)
    task_file(tmp_path / "train.jsonl", 24)
    task_file(tmp_path / "eval.jsonl", 4, seed=2)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"

    def torchrun(out_dir, *extra):
        path = write_cfg(tmp_path, model_dir, out_dir, strategy="fsdp2", loss_impl="torch",
                         per_device_train_batch_size=1)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tspin.cli", "iterate", "--config", str(path), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)  # its own process group: one killpg takes every rank

    ref = torchrun(ref_out)
    assert ref.wait(timeout=400) == 0, ref.stdout.read().decode()[-3000:]
    proc = torchrun(out)
    wait_for(proc, out, "iteration 0 after a mid-iteration checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "iter0" / "model").exists()  # really killed mid-iteration

    resumed = torchrun(out, "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.stdout.read().decode()[-3000:]
    assert_same_run(ref_out, out)


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
    ref = launch(write_cfg(tmp_path, model_dir, ref_out, **small))
    for i, (moment, save_steps) in enumerate(moments):
        proc = launch(write_cfg(tmp_path, model_dir, out, **{**small, "save_steps": save_steps}),
                      *(["--resume"] if i else []))
        kill_at(proc, out, moment)
    resumed = launch(write_cfg(tmp_path, model_dir, out, **small), "--resume")
    assert resumed.wait() == 0, resumed.stdout.read().decode()[-2000:]
    assert ref.wait() == 0, ref.stdout.read().decode()[-2000:]
    ra, rb = assert_same_run(ref_out, out)
    assert len(rb) == 12 and all(ra[k]["rewards/margins"] == rb[k]["rewards/margins"] for k in ra)
