"""The `tspin` console script: config loading/overrides/validation errors, data errors, refusal to overwrite,
and the embedded demo (smoke size)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _trainer_helpers import one_thread, task_file, tiny_model_dir, write_jsonl  # noqa: F401 (one_thread: autouse fixture)

from tspin.cli import main
from tspin.config import FIELDS, load_config
from tspin.state_file import read_state


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"))


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: spin\nlearning_rate: 1.0e-6\nbf16: false\ndata_fraction: 0.25\n")
    cfg = load_config(p, {"learning_rate": "2e-5", "num_iterations": "3", "max_grad_norm": "null",
                          "gradient_checkpointing": "true"})
    assert (cfg.method, cfg.learning_rate, cfg.num_iterations, cfg.bf16) == ("spin", 2e-5, 3, False)
    assert cfg.max_grad_norm is None and cfg.gradient_checkpointing is True and cfg.data_fraction == 0.25


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["--lerning_rate=1"], "unknown config key 'lerning_rate'"),
    (["--learning_rate=fast"], "--learning_rate/--learning-rate: invalid float value: 'fast'"),
    (["--lerning_rate", "1"], "unknown config key 'lerning_rate' (did you mean: learning_rate?)"),
    (["--learning=1"], "unknown config key 'learning'"),  # no abbreviations: a typo must not hit another key
    (["--method=dpo"], "method='dpo': expected one of tspin, spin, sft"),
    (["--data_fraction=1.5"], "data_fraction=1.5: must be in (0, 1]"),
    (["--max_prompt_length=4096"], "max_prompt_length=4096: must be < max_length"),
    (["--bf16=maybe"], "--bf16: Truthy value expected: got maybe"),
    (["--num_iterations=2.5"], "--num_iterations/--num-iterations: invalid int value: '2.5'"),
    (["--data_fraction=0.5", "--data_count=3"], "give data_fraction or data_count, not both"),
    (["--fused_loss=true", "--loss_impl=reference"],  # tspin_kernels' own rule, before any work starts
     "fused_loss='true': with loss_impl='reference': fused: impl='reference' is the full-logits oracle"),
])
def test_config_errors_name_the_key(args, message, capsys):
    rc, _, err = run(["train", *args], capsys)
    assert rc == 2 and message in err


def test_bad_yaml_and_unknown_yaml_key(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("method: [tspin\n")
    rc, _, err = run(["iterate", "--config", str(p)], capsys)
    assert rc == 2 and "bad.yaml: invalid YAML" in err
    p.write_text("methd: tspin\n")
    rc, _, err = run(["iterate", "--config", str(p)], capsys)
    assert rc == 2 and "bad.yaml: unknown config key 'methd'" in err


def test_data_errors_reach_the_user_with_file_and_line(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort ab", "response": "ab"}, {"prompt": "x"}])
    rc, _, err = run(["train", f"--model_name_or_path={model_dir}", f"--data_path={data}", "--method=sft",
                      f"--output_dir={tmp_path / 'o'}", "--progress=false"], capsys)
    assert rc == 2 and "d.jsonl: line 2: missing field 'response (or real)'" in err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
    rc, _, err = run(["train", f"--model_name_or_path={model_dir}", "--method=sft"], capsys)
    assert rc == 2 and "data_path is required" in err


def test_train_refuses_to_overwrite_without_resume(tmp_path, model_dir, capsys):
    data = task_file(tmp_path / "d.jsonl", 8)
    argv = ["train", f"--model_name_or_path={model_dir}", f"--data_path={data}", "--method", "sft",
            f"--output_dir={tmp_path / 'o'}", "--progress=false", "--max_length=40", "--max_prompt_length=24"]
    rc, out, _ = run(argv, capsys)
    assert rc == 0 and (tmp_path / "o" / "model" / "model.safetensors").exists()
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "pass --resume" in err
    rc, _, _ = run([*argv, "--resume"], capsys)
    assert rc == 0


def test_generate_command_writes_the_field(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "sort cab"}, {"prompt": "reverse abc"}])
    rc, out, _ = run(["generate", f"--model_name_or_path={model_dir}", f"--data_path={data}", "--max_new_tokens=4",
                      "--max_length=40", "--max_prompt_length=24", "--progress=false", "--out",
                      str(tmp_path / "g.jsonl"), "--field=proto"], capsys)
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["sort cab", "reverse abc"] and all("proto" in r for r in rows)


def test_yaml_values_take_the_command_line_conversions_and_checks(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 5e-7\nnum_train_epochs: 2\nmax_grad_norm: null\nbf16: no\n")  # 5e-7: a YAML string
    cfg = load_config(p)
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.max_grad_norm, cfg.bf16) == (5e-7, 2.0, None, False)
    assert isinstance(cfg.num_train_epochs, float)
    assert load_config(p, {"max_grad_norm": "0.5"}).max_grad_norm == 0.5  # the command line wins
    for text, message in (("learning_rate: fast\n", "--learning_rate/--learning-rate: invalid float value: 'fast'"),
                          ("learning_rate: null\n", "c.yaml: learning_rate: null is not allowed"),
                          ("lora_target_modules: [q_proj]\n", "c.yaml: lora_target_modules: expected a single value"),
                          ("- method\n", "c.yaml: expected a mapping of config keys")):
        p.write_text(text)
        rc, _, err = run(["train", "--config", str(p)], capsys)
        assert rc == 2 and message in err, err


def test_console_script_help_lists_every_config_key_with_help_and_default():
    exe = shutil.which("tspin") or f"{sys.prefix}/bin/tspin"
    out = subprocess.run([exe, "iterate", "--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "1000"}).stdout  # no wrapping (argparse breaks at hyphens)
    flat = " ".join(out.split())
    assert "--resume" in flat and "--config" in flat
    for name, f in FIELDS.items():
        assert f"--{name} " in flat, name
        help_text = " ".join(f.metadata["help"].split())
        assert f"{help_text} (default: " in flat, name
    assert "(default: 5e-07)" in flat and "(default: rmsprop)" in flat


def test_demo_quick_writes_summary_table_plot_and_resumes(tmp_path, capsys):
    rc, out, _ = run(["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"], capsys)
    assert rc == 0
    d = tmp_path / "demo"
    summary = json.loads((d / "summary.json").read_text())
    r = summary["result"]
    assert set(r["runs"]) == {"tspin", "tspin_nohist", "spin", "sft_cont", "pt_tspin"}
    assert set(r["models"]) == {"pi_0", "sft_cont", "pt_sft25"} | {f"{m}/iter{t}" for m in (
        "tspin", "tspin_nohist", "spin", "pt_tspin") for t in (0, 1)}
    tspin = r["runs"]["tspin"]
    assert len(tspin["val"]) == 3 and len(tspin["same_as_real"]) == 2 and tspin["steps"] == [1, 1]
    # matched budgets: every arm from pi_0 the same optimizer steps; SFT continued on 100% in one round
    assert all(sum(r["runs"][m]["steps"]) == 2 for m in ("tspin_nohist", "spin", "sft_cont"))
    assert r["runs"]["spin"]["examples"] == tspin["examples"] == [16, 16]  # 25% of 64, SPIN's mixing off
    assert r["runs"]["sft_cont"]["examples"] == [64] and r["runs"]["sft_cont"]["same_as_real"] is None
    assert tspin["pool"] == [16, 16] and r["runs"]["sft_cont"]["pool"] == [64]  # the prompts sampled / drawn from
    assert r["pi_0"]["stopped_by"] in ("patience", "max_rounds")
    # per-prompt test outcomes of every scored policy, one character per test prompt
    assert all(len(m["per_prompt"]) == 16 and set(m["per_prompt"]) <= {"0", "1"} for m in r["models"].values())
    assert len((d / "seed0" / "test" / "tspin" / "tspin__iter1.jsonl").read_text().splitlines()) == 16
    assert (d / "curves.png").stat().st_size > 1000
    # disk: the SFT rounds keep their evaluations and only the chosen model (OUT/best); finished models no optimizer
    pi0 = d / "seed0" / "pi0"
    assert (pi0 / "best" / "model.safetensors").exists() and (pi0 / "rounds.json").exists()
    assert not list(pi0.glob("iter*/model")) and list(pi0.glob("iter*/eval.json"))
    finished = list(d.glob("seed0/runs/*/iter*/model"))
    assert finished and all("optimizer" not in read_state(m / "trainer_state") for m in finished)
    assert "test EM" in out and "tspin/iter1" in out
    assert f"[demo] generation backend: {summary['generation_backend']}" in out  # says who sampled, and records it
    rc, _, err = run(["demo", "--out", str(d), "--quick", "--no-progress"], capsys)
    assert rc == 2 and "pass --resume" in err
    # `make demo` passes --resume: a second run on the finished demo skips every stage and prints the table again
    rc, again, _ = run(["demo", "--out", str(d), "--quick", "--no-progress", "--resume"], capsys)
    assert rc == 0 and out.splitlines()[-2] == again.splitlines()[-2]  # the table's last row
    assert json.loads((d / "summary.json").read_text()) == summary  # same numbers and recorded runtime
    # matplotlib is the optional extra `plot`: without it the demo says so in one line and writes the rest
    (d / "curves.png").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        rc, again, _ = run(["demo", "--out", str(d), "--quick", "--no-progress", "--resume"], capsys)
    assert rc == 0 and not (d / "curves.png").exists() and (d / "table.txt").exists()
    assert again.splitlines()[-1] == "[demo] no curves.png: matplotlib is not installed (pip install 'tspin[plot]')"
    rc, _, err = run(["demo", "--out", str(d), "--no-progress", "--resume"], capsys)
    assert rc == 2 and "other settings" in err


def test_shipped_recipes_load_and_demo_recipe_matches_the_demo():
    from pathlib import Path

    from tspin.experiments.demo import settings
    from tspin.experiments.runs import selfplay_config

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = {p.name: load_config(p) for p in sorted(root.glob("*.yaml"))}
    assert {"zephyr-7b-ultrachat-tspin.yaml", "zephyr-7b-ultrachat-spin.yaml", "demo-tspin.yaml"} <= set(recipes)
    z = recipes["zephyr-7b-ultrachat-tspin.yaml"]
    assert (z.optimizer, z.weight_decay, z.warmup_ratio, z.lr_scheduler, z.max_length, z.max_new_tokens,
            z.per_device_train_batch_size * z.gradient_accumulation_steps, z.num_iterations, z.data_count) == \
        ("rmsprop", 0.0, 0.1, "linear", 2048, 256, 64, 5, 50000)
    s = settings()
    demo = selfplay_config(out="runs/demo/seed0/runs/tspin", data="runs/demo/seed0/data", s=s, seed=0,
                           pi0="runs/demo/seed0/pi0/best", proto_path="runs/demo/seed0/proto/proto.jsonl",
                           method="tspin", params=s["chosen"]["tspin"], progress=True).to_dict()
    mine = recipes["demo-tspin.yaml"].to_dict()
    assert {k for k in demo if demo[k] != mine[k]} == {"output_dir"}
