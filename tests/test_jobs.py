"""The job runner behind `tspin demo` / `tspin study`: dependency order, skipping finished jobs (resume), errors,
and two worker processes."""

import json
import os

import pytest

from tspin.experiments.jobs import Job, run_jobs


def record(*, out: str, name: str, fail: bool = False, die: bool = False) -> dict:
    """A job that appends its name to a shared log (to check the order) and returns its pid."""
    if die:
        os._exit(1)  # what the kernel's OOM killer leaves behind: the process gone, no exception
    if fail:
        raise RuntimeError(f"job {name} failed")
    with open(os.path.join(os.path.dirname(out), "order.log"), "a") as f:
        f.write(name + "\n")
    import torch

    return {"name": name, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}


def _job(tmp_path, name, deps=(), **kw):
    d = tmp_path / name
    return Job(name, "test_jobs:record", d, dict(out=str(d), name=name, **kw), tuple(deps))


def test_dependencies_first_and_finished_jobs_are_skipped(tmp_path):
    jobs = [_job(tmp_path, "c", ["a", "b"]), _job(tmp_path, "b", ["a"]), _job(tmp_path, "a")]
    lines = []
    results = run_jobs(jobs, log=lines.append)
    assert (tmp_path / "order.log").read_text().split() == ["a", "b", "c"]
    assert results["c"]["name"] == "c" and results["c"]["seconds"] >= 0
    assert json.loads((tmp_path / "c" / "job.json").read_text())["name"] == "c"
    assert lines[-1].startswith("[jobs] 3/3 done: c")
    # a second start runs nothing (what a resumed study relies on) and returns the same results
    (tmp_path / "b" / "job.json").unlink()
    lines.clear()
    assert run_jobs(jobs, log=lines.append)["c"] == results["c"]
    assert (tmp_path / "order.log").read_text().split() == ["a", "b", "c", "b"]
    assert lines[0] == "[jobs] 2/3 jobs already done, 1 to run"


def test_errors_unknown_dependency_cycle_and_failing_job(tmp_path):
    with pytest.raises(ValueError, match="unknown dependencies"):
        run_jobs([_job(tmp_path, "a", ["nope"])])
    with pytest.raises(ValueError, match="cycle"):
        run_jobs([_job(tmp_path, "a", ["b"]), _job(tmp_path, "b", ["a"])], log=lambda _: None)
    with pytest.raises(RuntimeError, match="job x failed"):
        run_jobs([_job(tmp_path, "x", fail=True)], log=lambda _: None)
    assert not (tmp_path / "x" / "job.json").exists()  # a failed job is not marked done


def test_two_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b"), _job(tmp_path, "c", ["a", "b"])]
    results = run_jobs(jobs, processes=2, log=lambda _: None)
    assert {r["pid"] for r in results.values()} != {os.getpid()}  # ran in the workers
    assert (tmp_path / "order.log").read_text().split()[-1] == "c"


def test_every_job_gets_the_same_threads_whether_it_runs_alone_or_not(tmp_path, monkeypatch):
    """a, then b and c side by side, then d: a and d run alone, b and c side by side, and each has the 1 thread
    asked for (a thread count that followed the schedule would change a job's numbers on CPUs where torch splits a
    matmul's reduction over threads); the replay divides each job's CPU seconds by the threads it had."""
    from tspin.experiments.jobs import core_seconds

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b", ["a"]), _job(tmp_path, "c", ["a"]),
            _job(tmp_path, "d", ["b", "c"])]
    results = run_jobs(jobs, processes=2, log=lambda _: None)
    assert {k: (r["threads"], r["torch_threads"]) for k, r in results.items()} == {
        "a": (1, 1), "b": (1, 1), "c": (1, 1), "d": (1, 1)}
    assert core_seconds(results)["a"] == results["a"]["cpu_seconds"]
    assert core_seconds({"two": {"cpu_seconds": 3.0, "threads": 2}}) == {"two": 1.5}
    assert core_seconds({"old": {"cpu_seconds": 3.0}}) == {"old": 3.0}  # results written before threads were kept


def test_a_dead_worker_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "x", die=True)]
    with pytest.raises(RuntimeError, match=r"job (a|x): a worker process died .* start again to continue"):
        run_jobs(jobs, processes=2, log=lambda _: None)
    assert not (tmp_path / "x" / "job.json").exists()
    from tspin.cli import _exit_code
    from tspin.experiments.jobs import WorkerDiedError

    assert _exit_code(WorkerDiedError("x")) == 1  # `tspin demo` / `study`: one line on stderr, exit 1, no traceback


def test_makespan_replays_the_schedule(tmp_path):
    from tspin.experiments.jobs import makespan

    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b", ["a"]), _job(tmp_path, "c", ["a"]), _job(tmp_path, "d", ["b"])]
    seconds = {"a": 10, "b": 5, "c": 7, "d": 1}
    assert makespan(jobs, seconds, 1) == 23  # one worker: the sum
    assert makespan(jobs, seconds, 2) == 17  # a, then b and c side by side (c ends at 17), d after b (16)
    assert makespan(jobs, seconds, 8) == 17  # the critical path a -> c


def test_cpu_seconds_count_child_processes_running_and_ended():
    """A job's CPU seconds include what its child processes use (a vLLM engine samples in one that outlives the
    job), while they run and after they end."""
    import subprocess
    import sys

    from tspin.experiments.jobs import cpu_seconds

    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
            "print('done', flush=True)\n")
    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn + "input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "done"  # burned its CPU and is still running
    running = cpu_seconds() - before
    child.communicate("\n")  # let it end; wait() reaps it
    ended = cpu_seconds() - before
    assert running >= 0.6 and ended >= running


def engine_cores(*, out: str) -> dict:
    import time

    time.sleep(1.0)  # both jobs in flight at once: one per worker
    return {"bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "pid": os.getpid()}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_each_worker_gives_a_vllm_engine_cores_of_its_own(tmp_path, monkeypatch):
    """Two workers, one thread each: a vLLM engine started in each would bind to a different core (by default both
    would take the same one)."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    jobs = [Job(n, "test_jobs:engine_cores", tmp_path / n, dict(out=str(tmp_path / n))) for n in ("a", "b")]
    r = run_jobs(jobs, processes=2, threads=1, log=lambda _: None)
    assert r["a"]["pid"] != r["b"]["pid"]
    cores = sorted(os.sched_getaffinity(0))
    assert sorted(int(r[n]["bind"]) for n in "ab") == cores[:2]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # this process's environment is not touched
