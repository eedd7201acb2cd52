"""Resume bookkeeping of `tspin train` / `iterate`, in-process: a finished run resumed logs nothing twice, what a
kill during a write left (temp folders, a directory moved aside) is cleaned or put back on the next start, a start
that fails after recording its config does not block the corrected command, and a moved run with its inputs at
other (or differently spelled) paths resumes, while changed contents are refused."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _trainer_helpers import one_thread, tiny_run_inputs  # noqa: F401 (one_thread: autouse fixture)

from tspin.cli import main
from tspin.io import clean_stale_temps, read_jsonl

SMALL = "--max_length=40 --max_prompt_length=24 --max_new_tokens=4 --progress=false --device=cpu --method=sft"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("inputs"))


def _train(inputs: Path, out: Path, extra: str = "") -> int:
    return main(shlex.split(f"train --model_name_or_path={inputs / 'model'} --data_path={inputs / 'data.jsonl'} "
                            f"--output_dir={out} --eval_size=3 {SMALL} {extra}"))


def _eval_lines(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "eval"]


def test_a_finished_train_resumed_logs_nothing_again(inputs, tmp_path):
    out = tmp_path / "run"
    assert _train(inputs, out) == 0
    lines, summary = (out / "metrics.jsonl").read_text(), (out / "summary.json").read_text()
    assert len(_eval_lines(out)) == 1
    for _ in range(2):
        assert _train(inputs, out, "--resume") == 0
    assert (out / "metrics.jsonl").read_text() == lines and (out / "summary.json").read_text() == summary


def _killed_atomic_write(target: Path) -> None:
    """A real process killed inside tspin.io.atomic_path while it writes `target` (a checkpoint directory)."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom tspin.io import atomic_path\n"
            "with atomic_path(Path(sys.argv[1])) as tmp:\n    tmp.mkdir()\n"
            "    (tmp / 'model.safetensors').write_bytes(bytes(4096))\n    print('ready', flush=True)\n"
            "    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_a_resumed_run_cleans_what_killed_writes_left(inputs, tmp_path):
    out = tmp_path / "run"
    assert _train(inputs, out) == 0
    lines = (out / "metrics.jsonl").read_text()
    weights = (out / "model" / "model.safetensors").read_bytes()
    _killed_atomic_write(out / "checkpoints" / "step-000002")
    _killed_atomic_write(out / "model")
    # a kill between atomic_path's two renames, while replacing model/, leaves only the old copy aside
    os.replace(out / "model", out / ".model.tspin-old")
    hidden = sorted(p.name for p in out.rglob(".*"))
    assert len(hidden) == 3 and ".model.tspin-old" in hidden, hidden
    assert _train(inputs, out, "--resume") == 0
    assert not list(out.rglob(".*"))  # temp folders removed
    assert (out / "model" / "model.safetensors").read_bytes() == weights  # put back, not trained again
    assert (out / "metrics.jsonl").read_text() == lines


def test_clean_stale_temps_removes_only_its_own_temps_where_it_is_told_to_look(tmp_path):
    """The writer's own leftovers (.<name>.tspin-XXXXXXXX.tmp holding its one 'x' entry, .<name>.tspin-old) go,
    in the root and the sub-folders `descend` accepts; look-alikes (a user's .notes.old, .cache.abcd1234.tmp, a
    tagged folder holding other files) and anything in other folders stay, untouched."""
    (tmp_path / ".git").mkdir()
    (tmp_path / ".hidden.tmp").mkdir()  # not a mkdtemp name
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / ".data.jsonl.tspin-abcd_123.tmp").mkdir()
    (tmp_path / ".data.jsonl.tspin-abcd_123.tmp" / "x").write_text("half")
    (tmp_path / ".notes.old").mkdir()  # a user's: no tag
    (tmp_path / ".cache.abcd1234.tmp").mkdir()
    (tmp_path / ".mine.tspin-abcd1234.tmp").mkdir()  # tagged, but holds what atomic_path never writes
    (tmp_path / ".mine.tspin-abcd1234.tmp" / "notes.txt").write_text("keep")
    for sub in ("iter0", "deep"):
        (tmp_path / sub / ".model.tspin-old").mkdir(parents=True)
        (tmp_path / sub / "model").mkdir()
    removed = clean_stale_temps(tmp_path, descend=lambda name: name == "iter0")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [".data.jsonl.tspin-abcd_123.tmp",
                                                                            "iter0/.model.tspin-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.abcd1234.tmp", ".git", ".hidden.tmp",
                                                          ".mine.tspin-abcd1234.tmp", ".notes.old", "data.jsonl",
                                                          "deep", "iter0"]
    assert (tmp_path / ".mine.tspin-abcd1234.tmp" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == [".model.tspin-old", "model"]
    assert [p.name for p in (tmp_path / "iter0").iterdir()] == ["model"]


def test_a_start_that_fails_after_recording_its_config_does_not_block_the_corrected_command(inputs, tmp_path):
    out = tmp_path / "run"
    # 1e30 epochs passes the config checks and fails when the steps are laid out, after config.yaml is written
    assert _train(inputs, out, "--num_train_epochs=1e30") == 2
    assert (out / "config.yaml").exists()
    assert _train(inputs, out) == 0  # corrected, without --resume
    shutil.rmtree(out)
    assert _train(inputs, out, "--num_train_epochs=1e30") == 2
    assert _train(inputs, out, "--resume") == 0  # corrected, with --resume
    assert len(_eval_lines(out)) == 1


def test_a_moved_run_with_respelled_inputs_resumes_and_changed_contents_are_refused(inputs, tmp_path, capsys,
                                                                                    monkeypatch):
    out = tmp_path / "run"
    assert _train(inputs, out) == 0
    lines = (out / "metrics.jsonl").read_text()
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    copy = tmp_path / "copies"
    shutil.copytree(inputs, copy)
    monkeypatch.chdir(tmp_path)  # relative spellings of the same contents
    argv = shlex.split(f"train --model_name_or_path=./copies/model/ --data_path=copies//data.jsonl "
                       f"--output_dir=elsewhere/run --eval_size=3 {SMALL} --resume")
    assert main(argv) == 0
    assert (moved / "metrics.jsonl").read_text() == lines  # nothing computed again
    (copy / "data.jsonl").write_text((copy / "data.jsonl").read_text().replace("sort", "reverse", 1))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data_path holds other contents than when the run started" in err and "Traceback" not in err
