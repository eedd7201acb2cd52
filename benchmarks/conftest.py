"""Benchmark-suite plumbing.

- Benchmarking is OFF unless ``TSPIN_BENCH=1`` (or ``--benchmark-enable``): plain ``pytest`` / ``make test`` runs
  every benchmark body once, with its correctness check, and times nothing (CI stays fast, nothing rots).
- With benchmarking on, the session writes pytest-benchmark JSON to ``benchmarks/results/<device>-<yyyymmdd>.json``
  (``TSPIN_BENCH_OUT`` or ``--benchmark-json`` override it). Records of an earlier run in the same file are kept
  unless this run measured the same benchmark again, so a suite split over several invocations (the GPU machine
  allows 10 minutes a command) accumulates in one file. The file holds one ``matmul_peak`` record per device.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import common


def _enabled(config) -> bool:
    return os.environ.get("TSPIN_BENCH", "0") not in ("", "0") or bool(config.getoption("benchmark_enable", False))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # runs before pytest-benchmark's (trylast) pytest_configure reads these options
    if not _enabled(config):
        config.option.benchmark_disable = True
        return
    config.option.benchmark_enable = True
    if getattr(config.option, "benchmark_json", None) is None:
        path = common.results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        config._tspin_previous = path.read_text() if path.exists() else None  # read before anything truncates it
        config.option.benchmark_json = _json_target(path)


def _json_target(path):
    """pytest-benchmark >= 5 takes a path; 4.x took an open binary file (argparse.FileType("wb"))."""
    import pytest_benchmark

    if int(pytest_benchmark.__version__.split(".")[0]) >= 5:
        return path
    return open(path, "wb")  # noqa: SIM115 (pytest-benchmark writes and closes it at session end)


def _key(bench: dict) -> tuple:
    info = bench.get("extra_info") or {}
    if info.get("impl") == "matmul_peak":
        return ("matmul_peak", info.get("device"))
    return ("bench", bench.get("fullname"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["tspin"] = common.provenance()
    previous = getattr(config, "_tspin_previous", None)
    if not previous:
        return
    try:
        old = json.loads(previous)
    except ValueError:
        return
    new_keys = {_key(b) for b in output_json.get("benchmarks", [])}
    kept = [b for b in old.get("benchmarks", []) if _key(b) not in new_keys]
    output_json["benchmarks"] = kept + output_json.get("benchmarks", [])
    first = dict(old["tspin"], datetime=old.get("datetime")) if old.get("tspin") else None
    runs = old.get("tspin_runs", [first])
    this_run = dict(common.provenance(), datetime=output_json.get("datetime"))
    output_json["tspin_runs"] = [r for r in runs if r] + [this_run]
