"""`tspin study --quick`: grid on validation (seed 0), every seed, paired tests, verdicts, results JSON and plot;
a second start resumes (nothing reruns) and a study killed mid-way finishes with the numbers of an uninterrupted
one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainer_helpers import one_thread  # noqa: F401 (autouse fixture)

from tspin.cli import main
from tspin.experiments.study import QUICK_GRID, grid_points

ROOT = Path(__file__).resolve().parents[1]


def _study(out: Path, capsys, *extra):
    rc = main(["study", "--out", str(out), "--quick", "--seeds", "2", "--no-progress", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads((out / "study.json").read_text()), captured.out


def _numbers(study: dict) -> dict:
    """What a study measured, without the runtimes and provenance."""
    keep = ("chosen", "grid_validation", "claims", "comparisons", "summary", "settings", "grid")
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    return {**{k: study[k] for k in keep}, "per_seed": [strip(r) for r in study["per_seed"]]}


def test_quick_study_chooses_on_validation_tests_every_seed_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    study, printed = _study(out, capsys)
    points = grid_points(QUICK_GRID)
    # the grid and the validation numbers that chose each method's setting, for seed 0 only
    assert {m: [g["params"] for g in rows] for m, rows in study["grid_validation"].items()} == points
    for method, rows in study["grid_validation"].items():
        best = max(g["val_final"] for g in rows)
        assert [g for g in rows if g["params"] == study["chosen"][method]][0]["val_final"] == best
    # test evaluations exist only for the chosen runs; grid runs were never scored on the test prompts
    tested = {p.name for p in (out / "seed0" / "test").iterdir()}
    assert tested == {"sft", "tspin", "tspin_nohist", "spin", "sft25_cont"}
    assert not any((out / "seed0" / "runs").glob("*/test*"))
    assert len(study["per_seed"]) == 2 and study["seeds"] == [0, 1]
    for key in ("a1", "a2", "a", "b", "c"):
        assert study["claims"][key]["verdict"] in ("supported", "not supported", "contradicted")
        assert study["claims"][key]["test"] == study["claims"]["definitions"][key]
    assert all(len(c["p_two_sided"]) == 2 for c in study["comparisons"])
    assert study["summary"]["methods"]["tspin"]["test"][0]["n"] == 2
    assert study["versions"]["torch"] and study["machine"]["cores"] and "commit" in study
    rt = study["runtime"]
    assert 0 < rt["estimated_seconds_on_2_free_cores"] <= rt["cpu_seconds_total"] + 1
    assert set(rt["job_seconds"]) >= {"seed0/pretrain", "seed1/test/tspin"}
    assert (out / "study.png").stat().st_size > 1000 and "| claim | verdict |" in (out / "study.md").read_text()
    assert "| (b) T-SPIN on 25% matches or beats SFT on 100% |" in printed
    # a second start finds every job done and writes the same numbers
    again, _ = _study(out, capsys)
    assert _numbers(again) == _numbers(study)
    # another study's settings in the same directory are refused
    rc = main(["study", "--out", str(out), "--quick", "--seeds", "3", "--no-progress"])
    assert rc == 2 and "other settings" in capsys.readouterr().err


def _done_jobs(out: Path) -> int:
    try:
        return len(list(out.rglob("job.json")))
    except FileNotFoundError:  # a temp file renamed while the directory was listed
        return 0


@pytest.mark.slow
def test_killed_study_resumes_to_the_uninterrupted_numbers(tmp_path, capsys):
    ref, _ = _study(tmp_path / "ref", capsys)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tspin.cli", "study", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _done_jobs(out) < 8 and proc.poll() is None:  # mid-way: some jobs done, more to run
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "study.json").exists()
    resumed, _ = _study(out, capsys)
    assert _numbers(resumed) == _numbers(ref)


def test_committed_study_is_the_demos_source_and_meets_the_protocol():
    """docs/results/study.json (the README's numbers): settings chosen on validation, the demo runs exactly those
    settings, at least 3 seeds and 1000 test prompts, a verdict per claim, the test outcomes of every seed."""
    from tspin.experiments.demo import settings

    study = json.loads((ROOT / "docs" / "results" / "study.json").read_text())
    s = settings()
    assert study["chosen"] == s.pop("chosen")  # `tspin demo` runs what the study chose on validation
    assert study["settings"] == s
    assert len(study["seeds"]) >= 3 and study["settings"]["n_test"] >= 1000
    for method, rows in study["grid_validation"].items():
        assert max(r["val_final"] for r in rows) == [r for r in rows if r["params"] == study["chosen"][method]][0][
            "val_final"]
    for key in ("a1", "a2", "a", "b", "c"):
        assert study["claims"][key]["verdict"] in ("supported", "not supported", "contradicted")
    steps = study["claims"]["a1"]["per_seed"][0]["steps"]
    assert len(steps) == study["settings"]["iterations"] and all(x["n"] == 1000 for x in steps)
    assert study["commit"] and study["runtime"]["load_average"]["start"]
