"""A small runner for a graph of independent training jobs (the demo's and the study's runs): each job runs once its
dependencies are done, in this process or in a pool of worker processes, and is skipped when it already finished.

A job is a module-level function called with keyword arguments; its JSON-able result is written to
``<dir>/job.json`` (atomically, with the job's wall time) when it returns, and that file marks it done. Everything
a job trains resumes on its own (``tspin iterate`` / ``train`` with ``resume=True``), so a study killed at any
point continues where it stopped when started again.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_json

DONE_FILE = "job.json"


@dataclass
class Job:
    name: str  # unique, shown in progress lines
    fn: str  # "module:function"
    dir: Path  # the job's directory; DONE_FILE inside it marks the job done
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()

    def done(self) -> bool:
        return (Path(self.dir) / DONE_FILE).exists()

    def result(self) -> dict:
        return json.loads((Path(self.dir) / DONE_FILE).read_text())


def _resolve(fn: str) -> Callable:
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


class WorkerDiedError(RuntimeError):
    """A worker process of run_jobs ended without a result (killed, or could not start its job)."""


def run_job(fn: str, dir: str, kwargs: dict, threads: int = 1, quiet: bool = False) -> dict:  # noqa: A002
    """Run one job here (also the worker processes' entry point) and record its result and wall time."""
    import torch

    torch.set_num_threads(threads)  # tiny models: one intra-op thread per process is fastest on a shared box
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    t0, c0 = time.time(), cpu_seconds()
    result = _resolve(fn)(**kwargs)
    # CPU seconds too: on a shared machine the wall time says little about what the job costs
    result = {**result, "seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
              "threads": threads}
    atomic_write_json(Path(dir) / DONE_FILE, result)
    return result


def _worker_start(counter, threads: int) -> None:
    """A pool worker's start: cores of its own for a vLLM engine it may start (`threads` of them, worker i taking
    the i-th group of this machine's cores). Left alone, every CPU engine binds its threads to the same cores, so
    the workers' engines would sample on one core while the other waits."""
    from ..generation.vllm_engine import bind_cpu_engines

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    cores = sorted(os.sched_getaffinity(0))
    bind_cpu_engines([cores[(index * threads + k) % len(cores)] for k in range(min(threads, len(cores)))])


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its child processes, ended or running: a vLLM engine samples in
    a process of its own that lives on from job to job (running children are counted with psutil, when installed:
    vLLM depends on it)."""
    import resource

    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + ended.ru_utime + ended.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += t.user + t.system
    return total


def core_seconds(results: dict[str, dict]) -> dict[str, float]:
    """Each job's seconds on free cores: its CPU seconds spread over the threads it ran with (an earlier version
    gave a job that ran alone every worker's threads; a result written before jobs recorded it had one)."""
    return {name: r["cpu_seconds"] / r.get("threads", 1) for name, r in results.items()}


def makespan(jobs: list[Job], seconds: dict[str, float], processes: int) -> float:
    """The wall time `jobs` would take with `processes` workers that each get a whole core, if job j takes
    seconds[j] (e.g. its measured CPU seconds): the schedule run_jobs follows (ready jobs in list order), replayed.
    On a shared machine the measured wall time says more about the neighbours than about the work."""
    names = {j.name for j in jobs}
    done_at: dict[str, float] = {d: 0.0 for j in jobs for d in j.deps if d not in names}  # done before these jobs
    free = [0.0] * max(1, processes)
    todo = list(jobs)
    while todo:
        ready = [j for j in todo if all(d in done_at for d in j.deps)]
        # the next job starts when a worker is free and its dependencies are done
        j = min(ready, key=lambda j: max([min(free)] + [done_at[d] for d in j.deps]))
        k = free.index(min(free))
        start = max([free[k]] + [done_at[d] for d in j.deps])
        done_at[j.name] = free[k] = start + seconds.get(j.name, 0.0)
        todo.remove(j)
    return max(done_at.values(), default=0.0)


@contextmanager
def _stop_workers_on_interrupt():
    """Ctrl-C reaches the workers too, a SIGTERM only this process: on either, stop the pool's workers rather than
    wait for their jobs to end (each resumes on the next start). Entered inside the pool, so it runs first."""
    import multiprocessing

    try:
        yield
    except KeyboardInterrupt:
        for p in multiprocessing.active_children():
            p.terminate()
        raise


def run_jobs(jobs: list[Job], *, processes: int = 1, threads: int = 1, log: Callable[[str], None] = print,
             prefix: str = "[jobs]") -> dict[str, dict]:
    """Run every job not yet done, dependencies first, at most `processes` at a time; return every job's result.

    With processes=1 the jobs run in this process (progress bars allowed); otherwise in spawned workers, quiet.
    A failing job stops the run after the jobs in flight finish; finished jobs stay done for the next start.
    """
    by_name = {j.name: j for j in jobs}
    if len(by_name) != len(jobs):
        raise ValueError("jobs: names must be unique")
    for j in jobs:
        missing = [d for d in j.deps if d not in by_name]
        if missing:
            raise ValueError(f"job {j.name}: unknown dependencies {missing}")
    done = {j.name for j in jobs if j.done()}
    todo = [j for j in jobs if j.name not in done]
    total, t0 = len(jobs), time.time()
    if done:
        log(f"{prefix} {len(done)}/{total} jobs already done, {len(todo)} to run")

    def ready(j: Job) -> bool:
        return all(d in done for d in j.deps)

    def finished(j: Job, seconds: float) -> None:
        done.add(j.name)
        log(f"{prefix} {len(done)}/{total} done: {j.name} ({seconds:.0f} s; {time.time() - t0:.0f} s elapsed; "
            f"load {os.getloadavg()[0]:.1f})")  # the load: on a shared machine it explains the wall times

    if processes <= 1:
        while todo:
            j = next((j for j in todo if ready(j)), None)
            if j is None:
                raise ValueError(f"jobs: dependency cycle among {[j.name for j in todo]}")
            todo.remove(j)
            log(f"{prefix} start: {j.name}")
            finished(j, run_job(j.fn, str(j.dir), j.kwargs, threads)["seconds"])
        return {j.name: j.result() for j in jobs}

    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_start,
                             initargs=(ctx.Value("i", 0), threads)) as pool, _stop_workers_on_interrupt():
        running = {}
        while todo or running:
            starting = [j for j in todo if ready(j)][: processes - len(running)]
            # every job gets `threads`, also one that happens to run alone: on some CPUs torch splits a matmul's
            # reduction over its threads (the weight gradient's sum over tokens on a Xeon), so a job's numbers
            # would depend on what else was running when it started, and the demo would not repeat the study's
            # seed
            for j in starting:
                todo.remove(j)
                log(f"{prefix} start: {j.name}")
                running[pool.submit(run_job, j.fn, str(j.dir), j.kwargs, threads, True)] = j
            if not running:
                raise ValueError(f"jobs: dependency cycle among {[j.name for j in todo]}")
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished_now:
                j = running.pop(fut)
                try:
                    finished(j, fut.result()["seconds"])
                except BrokenProcessPool as e:  # the pool is gone: nothing in flight can finish
                    raise WorkerDiedError(
                        f"job {j.name}: a worker process died (killed, e.g. out of memory; or the script that "
                        f"called run_jobs lacks the `if __name__ == '__main__':` guard that spawned workers need). "
                        f"Finished jobs stay done: start again to continue, with processes=1 (--jobs 1) to run "
                        f"the jobs in this process") from e
                except Exception:
                    todo.clear()  # let the others finish, then stop
                    wait(running)
                    raise
    return {j.name: j.result() for j in jobs}
