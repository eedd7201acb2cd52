"""Benchmark-suite plumbing.

- Benchmarking is OFF unless ``TSPIN_BENCH=1`` (or ``--benchmark-enable``): plain ``pytest`` / ``make test`` runs
  every benchmark body once, with its correctness check, and times nothing (CI stays fast, nothing rots).
- With benchmarking on, the session writes pytest-benchmark JSON to ``benchmarks/results/<device>-<yyyymmdd>.json``
  (``TSPIN_BENCH_OUT`` overrides it; ``--benchmark-json PATH`` hands the whole writing to pytest-benchmark).
  Records of an earlier run in the same file are kept unless this run measured the same benchmark again, so a
  suite split over several invocations (the GPU machine allows 10 minutes a command) accumulates in one file. The
  file holds one ``matmul_peak`` record per device.
- The file is replaced whole when the session ends (written next to it, then renamed): a session that is cut
  leaves the results of the earlier ones as they were, never a truncated file. pytest-benchmark itself writes into
  a scratch file this conftest creates and removes; what ``--benchmark-json`` holds is whatever the installed
  pytest-benchmark's own option makes of a path (an open file up to 5.2, a path from 5.3), so every release from
  4.0 on writes its JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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
        config._tspin_previous = path.read_text() if path.exists() else None
        fd, scratch = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".partial.json", dir=path.parent)
        os.close(fd)
        config._tspin_results = (path, Path(scratch))
        config.option.benchmark_json = benchmark_json_value(scratch)


def benchmark_json_value(path):
    """What pytest-benchmark's ``--benchmark-json`` would hold had ``path`` been given on the command line: the
    option's own ``type`` applied to it (``argparse.FileType("wb")`` up to 5.2: an open file; ``Path`` from 5.3).
    Read from the plugin's declaration of the option, not from its version number."""
    from pytest_benchmark import plugin

    declared = {}

    class _Options:  # stands in for pytest's parser and option group: records what the plugin declares
        def getgroup(self, *args, **kwargs):
            return self

        def addoption(self, *names, **attrs):
            declared.update(dict.fromkeys(names, attrs))

        def addini(self, *args, **kwargs):
            pass

    plugin.pytest_addoption(_Options())
    convert = declared.get("--benchmark-json", {}).get("type") or str
    return convert(str(path))


def pytest_unconfigure(config):
    """Move the session's complete JSON into place (atomically); a session that wrote none changes nothing."""
    results = getattr(config, "_tspin_results", None)
    if results is None:
        return
    path, scratch = results
    held = config.option.benchmark_json
    if hasattr(held, "close"):  # pytest-benchmark < 5.3 closes it after writing; not when nothing was run
        held.close()
    try:
        text = scratch.read_text() if scratch.exists() else ""
        if text.strip():
            json.loads(text)  # whole, or it stays where it was
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(scratch, 0o666 & ~umask)  # a results file like any other (mkstemp makes it private)
            os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


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
