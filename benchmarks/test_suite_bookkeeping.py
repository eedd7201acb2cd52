"""The suite records its numbers right (issue 22): memory figures over the inputs alone, a results JSON written by
every pytest-benchmark release from 4.0 on and never left half-written, and a GPU run cut short keeps the parts
that finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks import conftest as bench_conftest

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- memory rise over the inputs alone
class TensorBytes:
    """A stand-in for the allocator statistics: "allocated" is the bytes of the inputs and of their gradients,
    read off the tensors themselves, so the test knows exactly what each call allocates."""

    def __init__(self, *tensors):
        self.tensors, self._peak = tensors, 0

    def sync(self) -> None:
        pass

    def allocated(self) -> int:
        return sum(t.nbytes + (t.grad.nbytes if t.grad is not None else 0) for t in self.tensors)

    def reset_peak(self) -> None:
        self._peak = self.allocated()

    def peak(self) -> int:
        return max(self._peak, self.allocated())


def test_peak_rise_counts_what_the_call_allocates():
    """An earlier call's gradients are freed before the baseline: the rise of a forward+backward with a trainable
    head is its gradients (the weight gradient included), not 0 (the bug that showed CCE at 0 GiB on the H200)."""
    hidden = torch.randn(6, 8, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (6, 8))

    def run(_):
        from benchmarks.peers import naive

        naive(hidden, weight, labels).backward()

    run(None)  # an earlier call: its gradients are still on the inputs
    assert hidden.grad is not None and weight.grad is not None
    rise = common.peak_rise(lambda: None, run, TensorBytes(hidden, weight), leaves=(hidden, weight))
    assert rise == hidden.nbytes + weight.nbytes


# ----------------------------------------------------------------------------- the results JSON
def _session(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSPIN_BENCH="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_kernels.py",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _install(target: Path, *specs: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--disable-pip-version-check",
                          "--target", str(target), *specs], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"pip could not install {specs} (PyPI must be reachable): {out.stderr[-2000:]}"


# (pytest-benchmark, the pytest it runs with): 4.0 and 5.2 hold --benchmark-json as an open file (5.2.3 with a
# pytest 8, as on the GPU image: with pytest 9 it fails for another reason); the venv's own release (a path from
# 5.3 on) runs with the venv's pytest
RELEASES = {"4.0.0": "pytest>=8.1,<9", "5.2.3": "pytest>=8.1,<9", "installed": None}


@pytest.mark.parametrize("release", list(RELEASES))
def test_results_json_written_by_every_pytest_benchmark_release(tmp_path, release):
    """Two benchmark sessions into one results file under a given pytest-benchmark: the file holds both sessions'
    records and runs, and no scratch file is left behind."""
    env = {"TSPIN_BENCH_OUT": str(tmp_path / "results" / "cpu-test.json")}
    if RELEASES[release]:
        _install(tmp_path / "site", f"pytest-benchmark=={release}", RELEASES[release])
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    (tmp_path / "results").mkdir()
    for sel in ("matmul_peak_cpu", "tiny-cpu-default-forward-trainable"):
        out = _session(env, "-k", sel)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "cpu-test.json").read_text())
    if RELEASES[release]:
        assert data["version"] == release
    names = sorted(b["name"] for b in data["benchmarks"])
    assert names == ["test_kernel_cpu[tiny-cpu-default-forward-trainable]", "test_matmul_peak_cpu"]
    assert len(data["tspin_runs"]) == 2
    default = next(b for b in data["benchmarks"] if "default" in b["name"])["extra_info"]
    assert default["loss_path"]["impl"] == "torch" and default["same_as"] == "torch"  # the path it took
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["cpu-test.json"]


def test_a_session_that_writes_nothing_leaves_the_results_as_they_were(tmp_path, monkeypatch):
    """The session's JSON goes to a scratch file; the results file is replaced only by a complete one, so a cut
    session (or one that ran no benchmark) leaves the earlier results whole."""
    results = tmp_path / "cpu-test.json"
    results.write_text('{"benchmarks": [{"name": "earlier"}]}')
    monkeypatch.setenv("TSPIN_BENCH", "1")
    monkeypatch.setenv("TSPIN_BENCH_OUT", str(results))

    class Config:
        option = type("Options", (), {"benchmark_json": None})()

        def getoption(self, name, default=None):
            return default

    config = Config()
    bench_conftest.pytest_configure(config)
    held = config.option.benchmark_json
    scratch = Path(held.name if hasattr(held, "write") else held)  # an open file (< 5.3) or a path
    assert scratch.parent == tmp_path and scratch != results and scratch.exists()
    assert results.read_text() == '{"benchmarks": [{"name": "earlier"}]}'  # not opened, not truncated
    bench_conftest.pytest_unconfigure(config)
    assert results.read_text() == '{"benchmarks": [{"name": "earlier"}]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-test.json"]


# ----------------------------------------------------------------------------- gpu_suite.sh cut short
FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python on a GPU machine: a "pytest" part adds a record to the results file (replaced whole, as the
# conftest does), the part named in $HANG_PART hangs after touching $HANG_MARK; everything else prints a line.
if [ "${1:-}" = -m ] && [ "${2:-}" = pytest ]; then
  sel=""
  while [ $# -gt 0 ]; do [ "$1" = -k ] && sel="$2"; shift; done
  if [ "$sel" = "$HANG_SEL" ]; then touch "$HANG_MARK"; sleep 60; exit 0; fi
  f=benchmarks/results/gpu-test.json
  { cat "$f" 2>/dev/null; echo "$sel"; } > "$f.tmp" && mv "$f.tmp" "$f"
  exit 0
fi
echo "fake python: $*"
"""


def test_gpu_suite_keeps_the_parts_that_finished_when_cut(tmp_path):
    """`gpu_suite.sh all` runs its parts as separate sessions; each part's results are in the results file (and in
    $OUT) before the next part starts, so a run cut during the third part keeps the first two."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_suite.sh", repo / "benchmarks" / "gpu_suite.sh")
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(FAKE_PYTHON))
    fake.chmod(0o755)
    out, mark = tmp_path / "out", tmp_path / "hanging"
    out.mkdir()
    third = "matmul_peak_gpu or (kernel_gpu and llama3)"  # kernels-llama3, the third of ALL_PARTS
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), HANG_SEL=third, HANG_MARK=str(mark))
    proc = subprocess.Popen(["bash", str(repo / "benchmarks" / "gpu_suite.sh"), "all"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists(), "the third part never started"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the cut: the whole run, as a time limit ends it
        proc.wait(timeout=30)
    parts = ["matmul_peak_gpu or (kernel_gpu and qwen)", "matmul_peak_gpu or (kernel_gpu and mistral)"]
    assert (repo / "benchmarks" / "results" / "gpu-test.json").read_text().splitlines() == parts
    assert (out / "gpu-test.json").read_text().splitlines() == parts  # copied after each part
    assert "part kernels-mistral done" in (out / "gpu-all.log").read_text()


def test_shapes_figure_from_the_committed_gpu_run(tmp_path):
    """The figure docs/guides/loss-paths.md shows, redrawn from the committed H200 files."""
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    files = [ROOT / "benchmarks" / "results" / f"h200-20261204-ec8b2c3-{s}.json" for s in ("qwen", "mistral", "llama3")]
    png = plot.shapes_figure(files, tmp_path / "paths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no forward / frozen kernel records"):
        plot.shapes_figure(files, tmp_path / "none.png", mode="forward", head="frozen")
