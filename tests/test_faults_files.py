"""Faults that enter through files: what a run directory, a model directory or a data file holds. A pickle planted
where tspin reads state or weights is refused and never runs (the marker it would write does not appear); a file
cut short or changed by hand names itself; a folder tspin did not make is refused, or with --overwrite used beside
its files without touching one of them; a proto file of other prompts under the same ids is refused. Each case
asserts the exit code, the one line (no traceback) and that the directories it names are byte-for-byte unchanged.
Every case runs in-process through tspin.cli.main on a tiny Llama."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _trainer_helpers import (
    one_clear_line,
    one_thread,  # noqa: F401 (autouse fixture)
    plant_pickle,
    snapshot,
    tiny_run_inputs,
    write_jsonl,
)

from tspin.cli import main
from tspin.io import read_jsonl
from tspin.run_dir import MANIFEST_FILE, owned_by_run

SMALL = "--max_length=40 --max_prompt_length=24 --max_new_tokens=4 --progress=false --device=cpu"


def _train_argv(d: Path, out: Path, extra: str = "") -> str:
    return (f"train --model_name_or_path={d / 'model'} --data_path={d / 'data.jsonl'} --output_dir={out} "
            f"--eval_size=3 --method=sft {SMALL} {extra}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny model, data, a finished `train` run (d/finished) and a proto file for the iterate cases."""
    d = tiny_run_inputs(tmp_path_factory.mktemp("faults_files"))
    assert main(shlex.split(_train_argv(d, d / "finished"))) == 0
    return d


def _run_copy(env: Path, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(env / "finished", out)
    return out


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _user_folder(root: Path) -> Path:
    """A user's folder holding names that look like tspin's temps and leftovers (the probe's cases)."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine\n")
    (root / ".notes.old").mkdir()
    (root / ".notes.old" / "a.txt").write_text("old notes\n")
    (root / "deep" / ".cache.abcd1234.tmp").mkdir(parents=True)
    (root / "deep" / ".cache.abcd1234.tmp" / "blob").write_bytes(b"\x00" * 16)
    (root / "deep" / ".venv.old").mkdir()
    (root / ".report.tspin-abcd1234.tmp").mkdir()  # tagged like tspin's, but holding what tspin never writes
    (root / ".report.tspin-abcd1234.tmp" / "draft.md").write_text("draft\n")
    (root / "deep" / ".model.tspin-old").mkdir()  # inside a folder tspin did not make
    return root


# ----------------------------------------------------------------------------------------------------- the matrix
@dataclass
class Case:
    id: str
    prepare: Callable[[Path, Path], tuple[str, list[Path]]]  # (env, tmp) -> (command line, dirs that must not change)
    fragment: str
    code: int


def _legacy_state_in_model(env, tmp):
    out = _run_copy(env, tmp)
    shutil.rmtree(out / "model" / "trainer_state")
    plant_pickle(out / "model" / "trainer_state.pt", tmp / "marker")
    return _train_argv(env, out, "--resume"), [out]


def _legacy_state_in_checkpoint(env, tmp):
    out = _run_copy(env, tmp)
    ckpt = out / "checkpoints" / "step-000002"
    shutil.move(out / "model", ckpt)  # a run killed after its checkpoint at step 2, before the end
    shutil.rmtree(ckpt / "trainer_state")
    for name in ("summary.json", "eval.json", "eval_generations.jsonl", "train_summary.json"):
        (out / name).unlink()
    plant_pickle(ckpt / "trainer_state.pt", tmp / "marker")
    return _train_argv(env, out, "--resume"), [out]


def _pickled_model_weights(env, tmp):
    model = tmp / "model_bin"
    shutil.copytree(env / "model", model)
    (model / "model.safetensors").unlink()
    plant_pickle(model / "pytorch_model.bin", tmp / "marker")
    return _train_argv(env, tmp / "out", f"--model_name_or_path={model}"), [model]


def _state_file_edit(name: str, edit: Callable[[Path], None]):
    def prepare(env, tmp):
        out = _run_copy(env, tmp)
        edit(out / "model" / "trainer_state" / name)
        return _train_argv(env, out, "--resume"), [out]
    return prepare


def _run_file_edit(name: str, text: str):
    def prepare(env, tmp):
        out = _run_copy(env, tmp)
        (out / name).write_text(text)
        return _train_argv(env, out, "--resume"), [out]
    return prepare


def _truncated_model(env, tmp):
    model = tmp / "model_cut"
    shutil.copytree(env / "model", model)
    _cut(model / "model.safetensors")
    return _train_argv(env, tmp / "out", f"--model_name_or_path={model}"), [model]


def _truncated_run_model(env, tmp):
    out = _run_copy(env, tmp)
    _cut(out / "model" / "model.safetensors")
    return _train_argv(env, out, "--resume"), [out]


def _user_dir(extra: str):
    def prepare(env, tmp):
        root = _user_folder(tmp / "mine")
        return _train_argv(env, root, extra), [root]
    return prepare


def _user_dir_with(name: str, extra: str = ""):
    def prepare(env, tmp):
        root = _user_folder(tmp / "mine")
        (root / name).write_text("the user's\n") if "." in name else (root / name).mkdir()
        return _train_argv(env, root, extra), [root]
    return prepare


def _legacy_run(env, tmp):
    out = _run_copy(env, tmp)
    (out / MANIFEST_FILE).unlink()  # as tspin 0.1.0 left it
    return _train_argv(env, out, "--resume"), [out]


def _model_without_record(manifest: bool):
    def prepare(env, tmp):
        out = tmp / "run"
        out.mkdir()
        shutil.copytree(env / "finished" / "model", out / "model")
        if manifest:
            shutil.copy(env / "finished" / MANIFEST_FILE, out / MANIFEST_FILE)
        return _train_argv(env, out), [out]
    return prepare


def _overwrite_removing_its_input(env, tmp):
    out = _run_copy(env, tmp)
    return _train_argv(env, out, f"--overwrite --model_name_or_path={out / 'model'}"), [out]


def _proto(kind: str):
    def prepare(env, tmp):
        rows = read_jsonl(env / "data.jsonl")
        proto = [{**r, "proto": "ab"} for r in rows]
        if kind == "other prompts":  # the same ids, other prompts (the probe: paired silently by id)
            proto = [{**p, "prompt": p["prompt"] + " again"} for p in proto]
        else:  # a row short
            proto = proto[:-1]
        path = write_jsonl(tmp / "proto.jsonl", proto)
        argv = (f"iterate --model_name_or_path={env / 'model'} --data_path={env / 'data.jsonl'} --method=tspin "
                f"--output_dir={tmp / 'out'} --proto_path={path} --num_iterations=1 {SMALL}")
        return argv, [tmp / "proto.jsonl"]
    return prepare


def _data(text: str):
    def prepare(env, tmp):
        (tmp / "d").mkdir()
        path = tmp / "d" / ("data.json" if text.startswith("[") else "data.jsonl")
        path.write_text(text)
        return _train_argv(env, tmp / "out", f"--data_path={path} --eval_size=0"), [tmp / "d"]
    return prepare


def _chat_template(template: str):
    def prepare(env, tmp):
        model = tmp / "model_chat"
        shutil.copytree(env / "model", model)
        (model / "chat_template.jinja").write_text(template)
        return _train_argv(env, tmp / "out", f"--model_name_or_path={model} --prompt_template=chat"), [model]
    return prepare


def _manifest(text: str):
    def prepare(env, tmp):
        out = _run_copy(env, tmp)
        (out / MANIFEST_FILE).write_text(text)
        return _train_argv(env, out, "--resume"), [out]
    return prepare


def _generate_out(kind: str):
    def prepare(env, tmp):
        (tmp / "g").mkdir()
        out = "" if kind == "empty" else str(tmp / "g")
        argv = (f"generate --model_name_or_path={env / 'model'} --data_path={env / 'data.jsonl'} {SMALL} "
                f"--out={out}")
        return argv, [tmp / "g"]
    return prepare


STATE_DAMAGED = "delete its checkpoint directory to go back to an earlier one"
CASES = [
    # pickles where tspin reads state or weights: refused, never unpickled
    Case("pickled-trainer-state-in-model", _legacy_state_in_model,
         "trainer_state.pt: a trainer state in the pickle format of tspin 0.1.0, which tspin no longer loads", 2),
    Case("pickled-trainer-state-in-checkpoint", _legacy_state_in_checkpoint,
         "step-000002/trainer_state.pt: a trainer state in the pickle format", 2),
    Case("pickled-model-weights", _pickled_model_weights,
         "its weights are pytorch_model.bin, a pickle, and no *.safetensors; tspin loads weights only from "
         "safetensors", 2),
    # state files cut short or replaced
    Case("trainer-state-json-cut", _state_file_edit("state.json", _cut), "trainer_state/state.json: not valid JSON",
         2),
    Case("trainer-state-json-not-ours", _state_file_edit("state.json", lambda p: p.write_text('{"a": 1}')),
         "trainer_state/state.json: not a tspin trainer state", 2),
    Case("trainer-state-json-is-a-pickle", _state_file_edit(
        "state.json", lambda p: plant_pickle(p, p.parents[3] / "marker")),
         "trainer_state/state.json: not valid JSON", 2),
    Case("trainer-state-tensors-cut", _state_file_edit("tensors.safetensors", _cut),
         "trainer_state/tensors.safetensors: not a complete safetensors file", 2),
    Case("trainer-state-tensors-missing", _state_file_edit("tensors.safetensors", Path.unlink),
         "trainer_state/tensors.safetensors: no such file", 2),
    # weights cut short
    Case("model-safetensors-cut", _truncated_model, "could not load the model (a safetensors file there is damaged", 2),
    Case("run-model-safetensors-cut-on-resume", _truncated_run_model,
         "model/model.safetensors: not a complete safetensors file", 2),
    # the run's own records changed by hand
    Case("eval-json-corrupt-on-resume", _run_file_edit("eval.json", '{"iteration": 0, '), "eval.json: not valid JSON",
         2),
    Case("inputs-json-corrupt-on-resume", _run_file_edit("inputs.json", "[1, 2"), "inputs.json: not valid JSON", 2),
    Case("config-yaml-corrupt-on-resume", _run_file_edit("config.yaml", "method: [sft\n"),
         "config.yaml: not valid YAML", 2),
    Case("manifest-corrupt", _manifest("{tspin"), f"{MANIFEST_FILE}: not valid JSON", 2),
    Case("manifest-not-ours", _manifest('{"tspin_run": "yes"}'), f"{MANIFEST_FILE}: not a tspin run manifest", 2),
    # directories tspin did not make
    Case("user-folder", _user_dir(""), "is not empty and is not a tspin run directory (no tspin-run.json)", 2),
    Case("user-folder-resume", _user_dir("--resume"), "is not empty and is not a tspin run directory", 2),
    Case("user-folder-overwrite-clashing-file", _user_dir_with("metrics.jsonl", "--overwrite"),
         "--overwrite: it holds metrics.jsonl, names a run writes, which tspin did not write there", 2),
    Case("user-folder-overwrite-clashing-dir", _user_dir_with("model", "--overwrite"),
         "--overwrite: it holds model, names a run writes", 2),
    Case("earlier-tspin-run", _legacy_run, "holds a run of an earlier tspin version (config.yaml, no tspin-run.json)",
         2),
    Case("model-without-run-record", _model_without_record(False), "is not empty and is not a tspin run directory",
         2),
    Case("run-with-model-but-no-config", _model_without_record(True),
         "holds results (model) but no config.yaml: the record of the run that made them is gone", 2),
    Case("overwrite-would-delete-the-model", _overwrite_removing_its_input,
         "model_name_or_path=", 2),
    # inputs that would pair or load silently wrong
    Case("proto-same-ids-other-prompts", _proto("other prompts"),
         "holds another prompt under that prompt_id (prompt_id '1-00000'; 12 of the 12 training prompts", 2),
    Case("proto-missing-a-prompt", _proto("short"), "has no row with that prompt_id (prompt_id '1-00011'; 1 of the 12",
         2),
    Case("data-empty-jsonl", _data(""), "data.jsonl: holds no records", 2),
    Case("data-blank-lines", _data("\n\n  \n"), "data.jsonl: holds no records", 2),
    Case("data-empty-json-list", _data("[]"), "data.json: holds no records", 2),
    Case("chat-template-stopped-by-sandbox", _chat_template("{{ ''.__class__.__mro__ }}"),
         "failed (SecurityError: access to attribute '__class__' of 'str' object is unsafe.)", 2),
    Case("chat-template-raises", _chat_template("{{ raise_exception('no user turns here') }}"),
         "failed (TemplateError: no user turns here)", 2),
    Case("generate-out-empty", _generate_out("empty"), "--out: expected the path of the JSONL file to write", 2),
    Case("generate-out-a-directory", _generate_out("dir"), "is a directory; expected the path of the JSONL file", 2),
]


def _state(paths: list[Path]) -> dict:
    """What `paths` hold; a run's config.yaml without its output_dir (a copied run records where it now lives)."""
    out = {}
    for w in paths:
        out[str(w)] = snapshot(w) if w.is_dir() else w.read_bytes()
        if w.is_dir() and "config.yaml" in out[str(w)]:
            try:
                cfg = yaml.safe_load(out[str(w)]["config.yaml"])
            except yaml.YAMLError:  # the case that breaks it: compared as bytes
                continue
            out[str(w)]["config.yaml"] = {k: v for k, v in cfg.items() if k != "output_dir"}
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_file_fault_gives_one_clear_line_and_touches_nothing(env, tmp_path, capsys, case):
    argv, watched = case.prepare(env, tmp_path)
    before = _state(watched)
    capsys.readouterr()
    rc = main(shlex.split(argv))
    one_clear_line(capsys.readouterr().err, case.fragment)
    assert rc == case.code
    assert _state(watched) == before
    assert not (tmp_path / "marker").exists()  # no planted pickle ran


def test_matrix_holds_the_probe_cases():
    assert len(CASES) >= 30


# ----------------------------------------------------------------------------------------------- what is allowed
def test_a_pickle_beside_the_weights_is_never_loaded(env, tmp_path):
    """A model directory with safetensors weights and a planted trainer_state.pt (e.g. an old run's model/) trains:
    tspin reads the weights and never the pickle."""
    model = tmp_path / "model"
    shutil.copytree(env / "model", model)
    plant_pickle(model / "trainer_state.pt", tmp_path / "marker")
    assert main(shlex.split(_train_argv(env, tmp_path / "out", f"--model_name_or_path={model}"))) == 0
    assert not (tmp_path / "marker").exists()


def test_overwrite_uses_a_users_folder_and_changes_nothing_of_it(env, tmp_path):
    """--overwrite on a folder that is not a run: the run's files go in beside the user's (the manifest first),
    and neither that start, a --resume (which cleans temps), nor a second --overwrite (which deletes the run's
    files) changes any of the user's look-alike names; the run's entries are exactly the layout's."""
    root = _user_folder(tmp_path / "mine")
    mine = snapshot(root)
    assert main(shlex.split(_train_argv(env, root, "--overwrite"))) == 0
    assert json.loads((root / MANIFEST_FILE).read_text())["tspin_run"] is True
    for extra in ("--resume", "--overwrite"):
        assert main(shlex.split(_train_argv(env, root, extra))) == 0
        now = snapshot(root)
        assert {k: v for k, v in now.items() if k in mine} == mine
        added = {k.split("/")[0] for k in now if k not in mine}
        assert added and all(owned_by_run(name) for name in added), added


def test_overwrite_of_a_run_deletes_its_files_only(env, tmp_path):
    """--overwrite on a finished run: its entries are replaced by the new run's; a file the user put in the run
    directory stays."""
    out = _run_copy(env, tmp_path)
    (out / "my-notes.md").write_text("keep me\n")
    (out / "model" / "stale.txt").write_text("inside a run entry: goes with it\n")
    assert main(shlex.split(_train_argv(env, out, "--overwrite --learning_rate=1e-3"))) == 0
    assert (out / "my-notes.md").read_text() == "keep me\n"
    assert not (out / "model" / "stale.txt").exists()
    assert "learning_rate: 0.001" in (out / "config.yaml").read_text()


def test_generate_reruns_keep_their_own_output_under_a_custom_field(env, tmp_path):
    """The probe: `generate --field=<custom>` refused its own output on a rerun with the same settings."""
    out = tmp_path / "g.jsonl"
    argv = shlex.split(f"generate --model_name_or_path={env / 'model'} --data_path={env / 'data.jsonl'} {SMALL} "
                       f"--out={out} --field=sample")
    assert main(argv) == 0
    before = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == before
    assert all("sample" in r for r in read_jsonl(out))


def test_generate_cleans_only_its_own_temps_next_to_out(env, tmp_path):
    """generate writes into a user's folder: it removes the temps its own writer left for --out and nothing else."""
    folder = _user_folder(tmp_path / "mine")
    (folder / ".g.jsonl.tspin-abcd1234.tmp").mkdir()  # a killed write of g.jsonl
    (folder / ".g.jsonl.tspin-abcd1234.tmp" / "x").write_text('{"half": ')
    mine = {k: v for k, v in snapshot(folder).items() if not k.startswith(".g.jsonl.")}
    argv = shlex.split(f"generate --model_name_or_path={env / 'model'} --data_path={env / 'data.jsonl'} {SMALL} "
                       f"--out={folder / 'g.jsonl'}")
    assert main(argv) == 0
    now = snapshot(folder)
    assert {k: v for k, v in now.items() if k in mine} == mine
    assert sorted(k for k in now if k not in mine) == ["g.jsonl", "g.jsonl.settings.json"]


def test_every_entry_a_run_writes_is_in_the_layout_overwrite_knows(env):
    """--overwrite deletes the layout's names only: every top-level entry a finished train run wrote is one."""
    names = [p.name for p in (env / "finished").iterdir()]
    assert "model" in names and all(owned_by_run(n) for n in names), names
    assert not owned_by_run("notes.txt") and not owned_by_run(".notes.old") and owned_by_run(".model.tspin-old")


def test_a_torch_save_cut_short_by_a_full_disk_says_so(tmp_path):
    """torch.save reports a short write as "[enforce fail at inline_container.cc:672] unexpected pos": the atomic
    writer says what it means (a real write under a file-size limit, as a full disk behaves), and leaves nothing."""
    import subprocess
    import sys

    code = ("import resource, sys, torch\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, resource.RLIM_INFINITY))\n"
            "from tspin.io import atomic_path\n"
            "try:\n"
            "    with atomic_path(sys.argv[1]) as tmp:\n"
            "        torch.save(torch.zeros(100000), tmp)\n"
            "except OSError as e:\n"
            "    print(str(e))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out" / "x.pt")], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith(f"could not write {tmp_path / 'out' / 'x.pt'}: no space left on the device or a file "
                               "size limit reached (torch.save: "), r.stdout + r.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_checkpoint_with_its_trainer_state_stays_a_plain_model_directory(env):
    """The trainer state lives in trainer_state/: the model directory's top-level *.safetensors are its weights only
    (vLLM loads every one of them as weights), and from_pretrained loads it as it is."""
    from transformers import AutoModelForCausalLM

    model = env / "finished" / "model"
    assert [p.name for p in model.glob("*.safetensors")] == ["model.safetensors"]
    assert sorted(p.name for p in (model / "trainer_state").iterdir()) == ["state.json", "tensors.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(model, use_safetensors=True) is not None
