"""`tspin study --quick`: grid on validation (seed 0), main and stability seeds, pooled tests, verdicts, results
JSON and plot; every stored p-value recomputes from the stored per-prompt outcomes; a second start resumes (nothing
reruns) and a study killed mid-way finishes with the numbers of an uninterrupted one; the pre-registration
document says what the code's design says."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainer_helpers import one_thread  # noqa: F401 (autouse fixture)

from tspin.cli import main
from tspin.experiments.preregistration import PREREGISTERED, QUICK_DESIGN
from tspin.experiments.study import grid_points
from tspin.experiments.verify import differences

ROOT = Path(__file__).resolve().parents[1]


def _study(out: Path, capsys, *extra):
    rc = main(["study", "--out", str(out), "--quick", "--no-progress", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads((out / "study.json").read_text()), captured.out


def _numbers(study: dict) -> dict:
    """What a study measured, without the runtimes and provenance."""
    keep = ("chosen", "grid_validation", "claims", "comparisons", "summary", "settings", "preregistered", "mde")
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    return {**{k: study[k] for k in keep}, "per_seed": [strip(r) for r in study["per_seed"]]}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick study for the tests of this file (about a minute of CPU)."""
    out = tmp_path_factory.mktemp("quick") / "study"
    assert main(["study", "--out", str(out), "--quick", "--no-progress"]) == 0
    return out, json.loads((out / "study.json").read_text())


def test_quick_study_chooses_on_validation_tests_every_seed_and_resumes(quick, capsys):
    out, study = quick
    points = grid_points(QUICK_DESIGN["grid"])
    # the grid and the validation numbers that chose each method's setting, on the grid seed only
    assert {m: [g["params"] for g in rows] for m, rows in study["grid_validation"].items()} == points
    for method, rows in study["grid_validation"].items():
        best = max(g["val_final"] for g in rows)
        assert [g for g in rows if g["params"] == study["chosen"][method]][0]["val_final"] == best
    assert study["chosen"]["tspin_nohist"] == study["chosen"]["tspin"]  # the ablation changes beta only
    # test evaluations exist only for the chosen runs; grid runs were never scored on the test prompts
    tested = {p.name for p in (out / "seed0" / "test").iterdir()}
    assert tested == {"pi_0", "tspin", "tspin_nohist", "spin", "sft_cont", "pt_sft25", "pt_tspin"}
    assert {p.name for p in (out / "seed1000" / "test").iterdir()} == {"pi_0"} | {
        f"{m}@lr0.001" for m in ("tspin", "tspin_nohist", "spin")}
    assert not any((out / "seed0" / "runs").glob("*/test*"))
    # every seed its own prompts
    prompts = {s: (out / f"seed{s}" / "data" / "test.jsonl").read_text() for s in (0, 1, 1000)}
    assert len(set(prompts.values())) == 3
    assert [r["seed"] for r in study["per_seed"]] == [0, 1, 1000, 1001]
    assert study["preregistered"] == json.loads(json.dumps(QUICK_DESIGN))
    # every scored model: per-prompt outcomes, steps; budgets matched across the arms from pi_0
    for r in study["per_seed"]:
        assert all(len(m["per_prompt"]) == 16 and "steps" in m for m in r["models"].values())
        assert len({m["steps"] for label, m in r["models"].items() if label.endswith("/iter1")}) == 1
        assert all(x["same_as_real"] is None or len(x["same_as_real"]) == 2 for x in r["runs"].values())
    main_seed = study["per_seed"][0]
    assert main_seed["models"]["sft_cont"]["steps"] == main_seed["models"]["tspin/iter1"]["steps"] == 2
    for key in ("a1", "a2", "a", "b", "b_from_pretrained", "c"):
        assert study["claims"][key]["verdict"] in ("supported", "not supported", "contradicted")
    assert set(study["claims"]["a2"]["per_setting"]) == {"lr0.001"}
    assert set(study["mde"]) == {"preregistered", "at_observed_discordance", "note"}
    assert study["mde"]["preregistered"] == study["preregistered"]["mde"]
    assert all(len(c["per_seed"]) == 2 for c in study["comparisons"])
    assert study["summary"]["main"]["models"]["tspin/iter0"]["test"]["n"] == 2
    assert study["versions"]["torch"] and study["machine"]["cores"] and "commit" in study
    rt = study["runtime"]
    assert 0 < rt["estimated_seconds_on_2_free_cores"] <= rt["cpu_seconds_total"] + 1
    assert set(rt["job_seconds"]) >= {"pretrain", "seed0/pi0", "seed1/test/tspin", "seed1001/test/spin@lr0.001"}
    assert (out / "study.png").stat().st_size > 1000 and "| claim | verdict |" in (out / "study.md").read_text()
    # a second start finds every job done and writes (and prints) the same numbers
    again, printed = _study(out, capsys)
    assert _numbers(again) == _numbers(study)
    assert "| (b) T-SPIN on 25% matches or beats SFT on 100%" in printed
    # a directory holding another design is refused
    recorded = json.loads((out / "study_settings.json").read_text())
    (out / "study_settings.json").write_text(json.dumps({**recorded, "design": {**recorded["design"],
                                                                                 "grid_seed": 1}}))
    rc = main(["study", "--out", str(out), "--quick", "--no-progress"])
    assert rc == 2 and "another design" in capsys.readouterr().err
    (out / "study_settings.json").write_text(json.dumps(recorded))


def test_every_stored_p_value_recomputes_from_the_stored_outcomes(quick):
    _, study = quick
    assert differences(study) == []
    # by hand, from the stored 0/1 strings alone: the pooled exact test of T-SPIN's first step, (b)'s difference
    seeds = study["preregistered"]["seeds"]["main"]
    runs = {r["seed"]: r["models"] for r in study["per_seed"]}
    b = c = 0
    for s in seeds:
        for x, y in zip(runs[s]["pi_0"]["per_prompt"], runs[s]["tspin/iter0"]["per_prompt"]):
            b += (x, y) == ("0", "1")
            c += (x, y) == ("1", "0")
    tail = sum(math.comb(b + c, i) for i in range(b, b + c + 1)) / 2 ** (b + c)
    step0 = study["claims"]["a1"]["trajectory"]["steps"][0]["pooled"]
    assert step0["p_b_better"] == pytest.approx(tail) and (step0["b_only"], step0["a_only"]) == (b, c)
    diff = sum(int(y) - int(x) for s in seeds for x, y in zip(runs[s]["sft_cont"]["per_prompt"],
                                                               runs[s]["tspin/iter1"]["per_prompt"]))
    assert study["claims"]["b"]["test"]["margin"]["diff"] == pytest.approx(diff / (16 * len(seeds)))
    # a tampered outcome is found
    flipped = json.loads(json.dumps(study))
    m = flipped["per_seed"][0]["models"]["tspin/iter1"]
    m["per_prompt"] = ("1" if m["per_prompt"][0] == "0" else "0") + m["per_prompt"][1:]
    assert any(d.startswith("claims.b.") for d in differences(flipped))


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
    cmd = [sys.executable, "-m", "tspin.cli", "study", "--out", str(out), "--quick", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _done_jobs(out) < 8 and proc.poll() is None:  # mid-way: some jobs done, more to run
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "study.json").exists()
    resumed, _ = _study(out, capsys)
    assert _numbers(resumed) == _numbers(ref)


def test_preregistration_document_states_the_code_design():
    """docs/results/preregistration.md (committed before the results) names the design the code runs: seeds,
    grid, stability settings, margin, alpha, and each claim's MDE as computed from the design."""
    from tspin.experiments.demo import settings

    doc = " ".join((ROOT / "docs" / "results" / "preregistration.md").read_text().split())  # lines rewrapped
    d = PREREGISTERED
    assert settings()["n_test"] == d["n_test_per_seed"] and settings()["iterations"] == 4
    assert f"main seeds {', '.join(map(str, d['seeds']['main']))}" in doc
    assert f"stability seeds {', '.join(map(str, d['seeds']['stability']))}" in doc
    for method, grid in d["grid"].items():
        assert f"`{method}`: learning rate {{{', '.join(f'{x:g}' for x in grid['learning_rate'])}}}" in doc
    assert "alpha = lambda = 1" in doc and "learning rates 1e-4 and 3e-4" in doc
    assert f"margin {d['rules']['margin']}" in doc and f"alpha {d['rules']['alpha']}" in doc
    for claim, m in d["mde"].items():
        assert f"| ({claim}) | {m['value']:.4f} |" in doc, claim


def test_the_committed_study_recomputes_and_the_demo_runs_its_choice():
    """docs/results/study.json, the study this repository reports: every stored p-value and verdict recomputes from
    its per-prompt outcomes, it ran the pre-registered design, and the demo's settings are its validation choice."""
    from tspin.experiments.demo import settings

    study = json.loads((ROOT / "docs" / "results" / "study.json").read_text())
    assert differences(study) == []
    assert study["preregistered"] == json.loads(json.dumps(PREREGISTERED))
    design = {k: v for k, v in settings().items() if k not in ("chosen", "chosen_by")}
    assert study["settings"] == design  # the sizes and schedules the demo runs are the ones the study ran
    main_seeds = [r for r in study["per_seed"] if r["role"] == "main"]
    assert [r["seed"] for r in main_seeds] == PREREGISTERED["seeds"]["main"]
    assert all(len(m["per_prompt"]) == PREREGISTERED["n_test_per_seed"] for r in main_seeds
               for m in r["models"].values())
    assert settings()["chosen"] == study["chosen"]
    # what the design was for: pi_0's samples equal the annotation on at most 30% of the self-play prompts
    assert all(r["proto_same_as_real"] <= 0.30 for r in study["per_seed"])


def test_the_superseded_third_study_still_recomputes():
    """docs/results/study-v3.json, the third design's study: its stored p-values and verdicts recompute from its
    per-prompt outcomes, and it ran the fourth design but for the answer separators and pi_0's round cap."""
    from tspin.experiments.demo import settings

    study = json.loads((ROOT / "docs" / "results" / "study-v3.json").read_text())
    assert differences(study) == []
    design = {k: v for k, v in settings().items() if k not in ("chosen", "chosen_by")}
    design["task"] = {k: v for k, v in design["task"].items() if k != "separators"}
    design["sft"]["max_rounds"] = 40
    assert study["settings"] == design
    assert study["preregistered"]["seeds"] == PREREGISTERED["seeds"]


def test_the_superseded_second_study_still_recomputes():
    """docs/results/study-v2.json: its stored p-values and verdicts recompute from its per-prompt outcomes."""
    study = json.loads((ROOT / "docs" / "results" / "study-v2.json").read_text())
    assert differences(study) == [] and study["preregistered"]["seeds"] == PREREGISTERED["seeds"]


def test_rounds_and_iterations_match_budgets_at_any_data_size():
    """pi_0's early-stopping rounds are `round_examples` examples whatever the data size (pi_0 on 100% and pi_0' on
    25% then count patience in the same steps); a self-play iteration can train a fraction of an epoch over the
    25% subset, and SFT continued on 100% still takes exactly the steps of all iterations together."""
    from tspin.experiments.demo import settings
    from tspin.experiments.runs import round_epochs, round_steps, selfplay_config, selfplay_steps

    s = settings()
    assert (s["n_train"], s["fraction"], s["selfplay_epochs"], s["sft"]["round_examples"]) == (16384, 0.25, 0.25, 4096)
    assert (round_epochs(s, None), round_epochs(s, s["fraction"])) == (0.25, 1.0)
    assert round_steps(s, None) == round_steps(s, s["fraction"]) == 128 and selfplay_steps(s) == 32
    kw = dict(out="o", data="d", s=s, seed=0, pi0="p", proto_path="p.jsonl")
    sp = selfplay_config(method="tspin", params={"learning_rate": 1e-4, "alpha": 0.1}, **kw)
    sft = selfplay_config(method="sft_cont", params={"learning_rate": 3e-4}, **kw)
    assert (sp.num_train_epochs, sp.data_fraction, sp.num_iterations) == (0.25, 0.25, 4)
    assert (sft.num_train_epochs, sft.data_fraction, sft.num_iterations) == (0.25, None, 1)  # 128 steps of 512
    one_epoch = {**s, "sft": {**s["sft"], "round_examples": None}}
    assert round_epochs(one_epoch, None) == round_epochs(one_epoch, s["fraction"]) == 1.0
