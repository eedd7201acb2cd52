"""Where a run's time goes (tspin.phases): one line per phase in OUT/phases.jsonl, nested phases' seconds taken out
of the enclosing phase's, and the phases of a real `tspin iterate` (eval, proto, sample, train, checkpoint)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from _trainer_helpers import one_thread, tiny_run_inputs  # noqa: F401 (one_thread: autouse fixture)

from tspin.cli import main
from tspin.io import read_jsonl
from tspin.phases import PhaseClock, phase_summary


class FakeTimer:
    """A clock that moves only when told: the test decides how long each phase takes."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_count_once(tmp_path):
    timer, path = FakeTimer(), tmp_path / "phases.jsonl"
    clock = PhaseClock(path, "cpu", timer=timer)
    with clock.phase("train", iteration=0):
        timer.now += 5.0
        with clock.phase("checkpoint", iteration=0):
            timer.now += 2.0
        timer.now += 1.0
        with clock.phase("checkpoint", iteration=0):
            timer.now += 0.5
    with clock.phase("eval", iteration=0):
        timer.now += 3.0
    rows = read_jsonl(path)
    assert [(r["phase"], r["seconds"]) for r in rows] == [("checkpoint", 2.0), ("checkpoint", 0.5), ("train", 6.0),
                                                          ("eval", 3.0)]
    assert all("peak_allocated_gib" not in r for r in rows)  # CPU: no device peaks
    assert phase_summary(path) == {"iter0": {"checkpoint": 2.5, "train": 6.0, "eval": 3.0}}
    # the iteration's lines add up to its wall time
    assert sum(phase_summary(path)["iter0"].values()) == pytest.approx(timer.now - 100.0)


def test_a_phase_that_raises_writes_nothing_and_a_torn_line_is_skipped(tmp_path):
    timer, path = FakeTimer(), tmp_path / "phases.jsonl"
    clock = PhaseClock(path, "cpu", timer=timer)
    with pytest.raises(RuntimeError), clock.phase("train", iteration=1):
        raise RuntimeError("killed")
    assert not path.exists()
    with clock.phase("proto", iteration=-1):
        timer.now += 1.0
    with open(path, "a") as f:
        f.write('{"phase": "sample", "iter')  # what a kill in the middle of a line leaves
    assert phase_summary(path) == {"start": {"proto": 1.0}}


def test_iterate_times_every_phase(tmp_path):
    inputs = tiny_run_inputs(tmp_path / "inputs")
    out = tmp_path / "run"
    args = (f"iterate --model_name_or_path={inputs / 'model'} --data_path={inputs / 'data.jsonl'} --output_dir={out} "
            "--eval_size=3 --max_length=40 --max_prompt_length=24 --max_new_tokens=4 --progress=false --device=cpu "
            "--method=tspin --num_iterations=2 --reuse_proto_at_iter0=true --per_device_train_batch_size=4")
    assert main(shlex.split(args)) == 0
    rows = read_jsonl(out / "phases.jsonl")
    assert all(r["seconds"] >= 0 for r in rows)
    summary = phase_summary(out / "phases.jsonl")
    assert set(summary) == {"start", "iter0", "iter1"}
    assert set(summary["start"]) == {"eval", "proto"}
    assert set(summary["iter0"]) == {"train", "checkpoint", "eval"}  # iteration 0 trains on the proto samples
    assert set(summary["iter1"]) == {"sample", "train", "checkpoint", "eval"}
    # the timing stays out of the files a resumed run must reproduce
    assert all(r["phase"] in ("train", "eval") for r in read_jsonl(out / "metrics.jsonl"))
    assert "phases" not in json.dumps(json.loads((out / "summary.json").read_text()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peaks_of_nested_phases(tmp_path):
    """The enclosing phase's peak includes what a nested phase allocated (each phase resets torch's counter), and
    the device-wide peak is at least this process's tensors."""
    path = tmp_path / "phases.jsonl"
    clock = PhaseClock(path, "cuda")
    with clock.phase("train", iteration=0):
        big = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
        with clock.phase("checkpoint", iteration=0):
            small = torch.empty(1 << 20, device="cuda")
        del big
        del small
    checkpoint, train = read_jsonl(path)
    assert train["peak_allocated_gib"] >= 1.0 and checkpoint["peak_allocated_gib"] >= 1.0  # big lived throughout
    assert train["peak_device_used_gib"] >= train["peak_allocated_gib"]
