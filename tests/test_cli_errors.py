"""The command line's bad-input matrix: every expected failure (a bad setting, a missing or malformed file, an
output_dir that cannot hold a run, an unknown device, a column `generate` would overwrite, a run whose loss goes
non-finite) ends with a non-zero exit and one line on stderr that names the key, file, path or device, and no
traceback. Most cases run in-process through tspin.cli.main; a few run the real console script (a disk-full write
under a file-size limit, --debug)."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from _trainer_helpers import one_clear_line as _one_clear_line
from _trainer_helpers import one_thread, tiny_run_inputs, write_jsonl  # noqa: F401 (one_thread: autouse)
from safetensors.torch import load_file, save_file

from tspin.cli import main
from tspin.io import read_jsonl
from tspin.run_dir import holds_results
from tspin.state_file import read_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--max_length=40 --max_prompt_length=24 --max_new_tokens=4 --progress=false --device=cpu"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, good and bad data files, and a finished run, shared by the matrix."""
    d = tiny_run_inputs(tmp_path_factory.mktemp("cli_errors"))
    (d / "bad_utf8.jsonl").write_bytes(b'{"prompt": "sort ab", "response": "ab"}\n'
                                       b'{"prompt": "x\xff", "response": "y"}\n')
    (d / "bad_json.jsonl").write_text('{"prompt": "sort ab", "response": "ab"}\n{"prompt": "x", \n')
    write_jsonl(d / "no_response.jsonl", [{"prompt": "sort ab", "response": "ab"}, {"prompt": "x"}])
    write_jsonl(d / "with_generated.jsonl", [{"prompt": "sort ab", "generated": "ba"}])
    (d / "inf_ref.jsonl").write_text('{"prompt": "sort ab", "real": "ab", "generated": "ba", "ref_real": Infinity, '
                                     '"ref_generated": -3.0}\n')
    (d / "data.csv").write_text("prompt,response\nsort ab,ab\n")
    (d / "plain_dir").mkdir()
    (d / "empty_model").mkdir()
    (d / "a_file.txt").write_text("not a directory\n")
    (d / "bad_utf8.yaml").write_bytes(b"method: tspin\nbeta: 0.1 \xff\n")
    (d / "bad.yaml").write_text("method: [tspin\n")
    (d / "changed.jsonl").write_text((d / "data.jsonl").read_text().replace("sort", "reverse", 1))
    shutil.copytree(d / "model", d / "no_chat_template")  # the demo tokenizer has no chat template
    base = f"--model_name_or_path={d / 'model'} --data_path={d / 'data.jsonl'} {SMALL}"
    assert main(shlex.split(f"train {base} --method=sft --output_dir={d / 'finished'}")) == 0
    return d


def _argv(env: Path, out: Path, text: str) -> list[str]:
    base = f"--model_name_or_path={env / 'model'} --data_path={env / 'data.jsonl'} --output_dir={out} {SMALL}"
    return shlex.split(text.format(base=base, d=env, out=out))


# (id, command line, fragment the one line must hold, exit code). {base}: model, data, output_dir and tiny sizes.
CASES = [
    # non-finite and out-of-range settings: the key is named, before anything is loaded
    ("beta-nan", "train {base} --beta=nan", "beta=nan: must be a finite number", 2),
    ("alpha-inf", "train {base} --alpha=inf", "alpha=inf: must be a finite number", 2),
    ("alpha-beyond-float32", "train {base} --alpha=1e39", "alpha=1e+39: must be a finite number", 2),
    # loss scales: the kernels' bound (a larger scale overflows the float32 loss), the same rule as the API's
    ("alpha-above-loss-scale-bound", "train {base} --alpha=1e7", "alpha=10000000.0: must be <= 1e+06", 2),
    ("beta-above-loss-scale-bound", "iterate {base} --beta=2e6", "beta=2000000.0: must be <= 1e+06", 2),
    ("beta-iter0-above-loss-scale-bound", "iterate {base} --beta_iter0=1e30", "beta_iter0=1e+30: must be <= 1e+06",
     2),
    ("spin-lambda-above-loss-scale-bound", "train {base} --method=spin --spin_lambda=5e6",
     "spin_lambda=5000000.0: must be <= 1e+06", 2),
    ("max-grad-norm-nan", "train {base} --max_grad_norm=nan", "max_grad_norm=nan", 2),
    ("max-grad-norm-zero", "train {base} --max_grad_norm=0", "max_grad_norm=0.0: must be > 0 or null", 2),
    ("weight-decay-inf", "train {base} --weight_decay=inf", "weight_decay=inf", 2),
    ("weight-decay-negative", "train {base} --weight_decay=-0.1", "weight_decay=-0.1: must be >= 0", 2),
    ("temperature-nan", "generate {base} --temperature=nan --out={out}/g.jsonl", "temperature=nan", 2),
    ("temperature-negative", "train {base} --temperature=-1", "temperature=-1.0: must be >= 0", 2),
    ("epochs-inf", "train {base} --num_train_epochs=inf", "num_train_epochs=inf", 2),
    ("epochs-nan", "train {base} --num_train_epochs=nan", "num_train_epochs=nan", 2),
    ("epochs-zero", "train {base} --num_train_epochs=0", "num_train_epochs=0.0: must be > 0", 2),
    ("lr-nan", "train {base} --learning_rate=nan", "learning_rate=nan", 2),
    ("lr-inf", "train {base} --learning_rate=inf", "learning_rate=inf", 2),
    ("lr-negative", "train {base} --learning_rate=-1e-5", "learning_rate=-1e-05: must be > 0", 2),
    ("lr-not-a-number", "train {base} --learning_rate=fast", "--learning_rate/--learning-rate: invalid float", 2),
    ("warmup-nan", "train {base} --warmup_ratio=nan", "warmup_ratio=nan", 2),
    ("warmup-one", "train {base} --warmup_ratio=1", "warmup_ratio=1.0: must be in [0, 1)", 2),
    ("top-p-nan", "generate {base} --top_p=nan --out={out}/g.jsonl", "top_p=nan", 2),
    ("top-p-zero", "train {base} --top_p=0", "top_p=0.0: must be in (0, 1]", 2),
    ("top-k-negative", "train {base} --top_k=-1", "top_k=-1: must be >= 0", 2),
    ("generation-backend-unknown", "train {base} --generation_backend=vlm",
     "generation_backend='vlm': expected one of hf, vllm", 2),
    ("vllm-memory-zero", "iterate {base} --vllm_gpu_memory_utilization=0",
     "vllm_gpu_memory_utilization=0.0: must be in (0, 1]", 2),
    ("vllm-memory-nan", "generate {base} --vllm_gpu_memory_utilization=nan --out={out}/g.jsonl",
     "vllm_gpu_memory_utilization=nan", 2),
    pytest.param("vllm-not-installed", "iterate {base} --generation_backend=vllm", "pip install 'tspin[vllm]'", 2,
                 marks=pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here")),
    ("spin-lambda-inf", "train {base} --method=spin --spin_lambda=-inf", "spin_lambda=-inf", 2),
    ("beta-iter0-nan", "iterate {base} --beta_iter0=nan", "beta_iter0=nan", 2),
    ("data-fraction-nan", "train {base} --data_fraction=nan", "data_fraction=nan", 2),
    ("lora-alpha-inf", "train {base} --lora_rank=4 --lora_alpha=inf", "lora_alpha=inf", 2),
    ("adam-beta1-one", "train {base} --adam_beta1=1", "adam_beta1=1.0: must be in [0, 1)", 2),
    ("adam-beta2-negative", "train {base} --adam_beta2=-0.5", "adam_beta2=-0.5: must be in [0, 1)", 2),
    ("rmsprop-alpha-nan", "train {base} --rmsprop_alpha=nan", "rmsprop_alpha=nan", 2),
    ("seed-negative", "train {base} --seed=-1", "seed=-1: must be in [0, 2**32)", 2),
    ("data-seed-huge", "train {base} --data_seed=4294967296", "data_seed=4294967296", 2),
    ("eval-max-new-tokens-zero", "train {base} --eval_max_new_tokens=0", "eval_max_new_tokens=0", 2),
    ("answer-pattern-bad", "train {base} --eval_answer_pattern=[a-", "eval_answer_pattern='[a-': is not a regular", 2),
    ("answer-pattern-empty", "train {base} --eval_answer_pattern=a*", "must not match the empty string", 2),
    ("batch-size-zero", "train {base} --per_device_train_batch_size=0", "per_device_train_batch_size=0", 2),
    ("iterations-float", "iterate {base} --num_iterations=2.5", "--num_iterations/--num-iterations: invalid int", 2),
    ("prompt-longer-than-max", "train {base} --max_prompt_length=40", "max_prompt_length=40: must be < max_length",
     2),
    ("method-unknown", "train {base} --method=dpo", "method='dpo': expected one of", 2),
    ("optimizer-unknown", "train {base} --optimizer=sgd", "optimizer='sgd'", 2),
    ("template-without-prompt", "train {base} --prompt_template=Q:", "prompt_template='Q:'", 2),
    ("unknown-key", "train {base} --lerning_rate=1", "unknown config key 'lerning_rate'", 2),
    ("bool-not-bool", "train {base} --bf16=maybe", "--bf16: Truthy value expected", 2),
    ("epochs-beyond-any-run", "train {base} --method=sft --num_train_epochs=1e30", "num_train_epochs=1e+30", 2),
    # devices
    ("device-unknown", "train {base} --device=tpu", "device='tpu': expected auto, cpu, cuda or cuda:N", 2),
    ("device-bad-index", "train {base} --device=cuda:x", "device='cuda:x'", 2),
    pytest.param("device-cuda-missing", "train {base} --method=sft --device=cuda:3", "device='cuda:3'", 2,
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")),
    ("strategy-without-launcher", "train {base} --method=sft --strategy=ddp", "strategy='ddp' needs a process group",
     2),
    # the command line itself
    ("no-command", "", "required: command", 2),
    ("unknown-command", "fly", "invalid choice: 'fly'", 2),
    ("generate-without-out", "generate {base}", "required: --out", 2),
    ("config-without-value", "train --config", "argument --config: expected one argument", 2),
    ("demo-unknown-flag", "demo --bogus", "unrecognized arguments: --bogus", 2),
    # config files
    ("config-missing", "train --config {d}/nope.yaml", "config file not found: " + "{d}/nope.yaml", 2),
    ("config-not-utf8", "train --config {d}/bad_utf8.yaml", "bad_utf8.yaml: not valid UTF-8", 2),
    ("config-invalid-yaml", "train --config {d}/bad.yaml", "bad.yaml: invalid YAML", 2),
    # model and tokenizer paths
    ("model-missing", "train {base} --model_name_or_path={d}/nope", "model_name_or_path='{d}/nope': no such directory",
     2),
    ("model-is-a-file", "train {base} --model_name_or_path={d}/a_file.txt", "model_name_or_path='{d}/a_file.txt': "
                                                                            "expected a model directory", 2),
    ("model-empty-dir", "train {base} --method=sft --model_name_or_path={d}/empty_model",
     "{d}/empty_model: could not load the model", 2),
    ("model-required", "train {base} --model_name_or_path=", "model_name_or_path is required", 2),
    ("tokenizer-missing", "train {base} --tokenizer_name_or_path=./nope/tok",
     "tokenizer_name_or_path='./nope/tok': no such directory", 2),
    ("chat-template-missing", "train {base} --method=sft --model_name_or_path={d}/no_chat_template "
                              "--prompt_template=chat", "the tokenizer has no chat_template", 2),
    # data files
    ("data-missing", "train {base} --data_path={d}/nope.jsonl", "data file not found: {d}/nope.jsonl", 2),
    ("data-required", "train {base} --data_path=", "data_path is required", 2),
    ("data-not-utf8", "train {base} --data_path={d}/bad_utf8.jsonl", "bad_utf8.jsonl: line 2: not valid UTF-8", 2),
    ("data-invalid-json", "train {base} --data_path={d}/bad_json.jsonl", "bad_json.jsonl: line 2: invalid JSON", 2),
    ("data-missing-field", "train {base} --method=sft --data_path={d}/no_response.jsonl",
     "no_response.jsonl: line 2: missing field 'response (or real)'", 2),
    ("data-reference-logp-inf", "train {base} --method=spin --data_path={d}/inf_ref.jsonl",
     "inf_ref.jsonl: line 1: field 'ref_real' must be a finite number, got inf", 2),
    ("data-unsupported-type", "train {base} --data_path={d}/data.csv", "data.csv: unsupported data file type", 2),
    ("data-plain-dir", "train {base} --data_path={d}/plain_dir", "plain_dir: a directory must be a dataset", 2),
    ("data-glob-no-match", "train {base} --data_path={d}/none-*.parquet", "no match for {d}/none-*.parquet", 2),
    ("eval-data-missing", "train {base} --eval_data_path={d}/nope.jsonl", "data file not found: {d}/nope.jsonl", 2),
    ("data-count-too-large", "train {base} --data_count=1000", "data_count=1000 exceeds the 12 available", 2),
    ("eval-size-too-large", "train {base} --eval_size=12", "eval_size=12 leaves no training data", 2),
    ("proto-path-missing", "iterate {base} --proto_path={d}/nope.jsonl", "proto_path='{d}/nope.jsonl': file not found",
     2),
    # output directories
    ("output-dir-empty", "train {base} --output_dir=", "output_dir='': must name a directory (an empty value would "
                                                       "be the current directory)", 2),
    ("output-dir-empty-iterate", "iterate {base} --output_dir=", "output_dir='': must name a directory", 2),
    ("resume-and-overwrite", "train {base} --resume --overwrite", "--resume and --overwrite: choose one", 2),
    ("output-dir-under-a-file", "train {base} --output_dir={d}/a_file.txt/run", "{d}/a_file.txt is a file", 2),
    ("output-dir-is-a-file", "train {base} --output_dir={d}/a_file.txt", "{d}/a_file.txt is a file", 2),
    pytest.param("output-dir-not-writable", "train {base} --output_dir=/sys/tspin-test/run",
                 "output_dir='/sys/tspin-test/run': cannot write in /sys", 1,
                 marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="no /sys (not Linux)")),
    ("run-exists-without-resume", "train {base} --method=sft --output_dir={d}/finished",
     "output_dir {d}/finished already holds a run", 2),
    ("resume-other-settings", "train {base} --method=sft --output_dir={d}/finished --learning_rate=1 --resume",
     "config differs from {d}/finished/config.yaml in learning_rate", 2),
    ("resume-other-data", "train {base} --method=sft --output_dir={d}/finished --data_path={d}/changed.jsonl --resume",
     "data_path holds other contents than when the run started", 2),
    # generate never overwrites an input column, nor a file that is not its own output
    ("generate-field-prompt", "generate {base} --out={out}/g.jsonl --field=prompt", "--field='prompt'", 2),
    ("generate-field-real", "generate {base} --out={out}/g.jsonl --field=real", "--field='real'", 2),
    ("generate-field-prompt-id", "generate {base} --out={out}/g.jsonl --field=prompt_id", "--field='prompt_id'", 2),
    ("generate-field-ref", "generate {base} --out={out}/g.jsonl --field=ref_real", "--field='ref_real'", 2),
    ("generate-field-blank", "generate {base} --out={out}/g.jsonl --field=a+b", "--field='a+b'", 2),
    ("generate-field-input-column", "generate {base} --data_path={d}/with_generated.jsonl --out={out}/g.jsonl",
     "with_generated.jsonl already has a 'generated' column", 2),
    ("generate-out-is-the-data", "generate {base} --out={d}/data.jsonl", "--out {d}/data.jsonl: the file exists and "
                                                                          "is not this command's output", 2),
    ("generate-out-under-a-file", "generate {base} --out={d}/a_file.txt/g.jsonl", "{d}/a_file.txt is a file", 2),
]


def _params(cases):
    """(id, ...) tuples and pytest.param(id, ..., marks=) entries as parameters named by their id."""
    for c in cases:
        values, marks = (c.values, c.marks) if hasattr(c, "marks") else (c, ())
        yield pytest.param(*values[1:], id=values[0], marks=marks)


@pytest.mark.parametrize("text, fragment, code", list(_params(CASES)))
def test_bad_input_gives_one_clear_line(env, tmp_path, capsys, text, fragment, code):
    out = tmp_path / "out"
    rc = main(_argv(env, out, text))
    err = capsys.readouterr().err
    _one_clear_line(err, fragment.format(d=env))
    assert rc == code
    assert not holds_results(out)  # nothing recorded that would block the corrected command


def test_matrix_has_at_least_fifty_cases():
    assert len(CASES) >= 50


def test_a_diverging_run_stops_names_the_step_and_keeps_the_last_finite_weights(env, tmp_path, capsys):
    """learning_rate=1e30 sends the weights far out after one step; the next step's gradient norm is not finite:
    the run stops there (exit 1), the message names the step and where the weights before it are, those weights are
    the ones the finite first step left, and no model/ (the iteration's result) is written."""
    out = tmp_path / "run"
    rc = main(_argv(env, out, "train {base} --method=sft --learning_rate=1e30 --per_device_train_batch_size=4"))
    line = _one_clear_line(capsys.readouterr().err, "train sft: step 2/3: non-finite")
    kept = out / "nonfinite-step-000002"
    assert rc == 1 and f"the weights before this step are in {kept}" in line.replace("The weights", "the weights")
    assert not (out / "model").exists()
    weights = load_file(str(kept / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    initial = load_file(str(env / "model" / "model.safetensors"))
    assert any(not torch.equal(weights[k], initial[k]) for k in initial)  # step 1 was applied, step 2 was not
    lines = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1]  # only the finite step was logged
    state = read_state(kept / "trainer_state")
    assert state["failed_step"] == 2 and len(state["prompt_ids"]) == 4


def test_a_first_step_that_is_not_finite_keeps_the_initial_weights(env, tmp_path, capsys):
    """A model whose (tied) LM head holds one row near float32's largest value: its logits overflow, so the very
    first T-SPIN loss is not finite. Nothing is applied, the kept weights are the initial ones, bit for bit."""
    data = tmp_path / "triplets.jsonl"
    write_jsonl(data, [{**r, "real": r["response"], "generated": r["response"][::-1] + "ab", "proto": "a"}
                       for r in read_jsonl(env / "data.jsonl")])
    model = tmp_path / "overflowing"
    shutil.copytree(env / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"][-1] = 3e38  # the last token's logit: +-inf at every position
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    rc = main(_argv(env, out, f"train {{base}} --data_path={data} --method=tspin --model_name_or_path={model}"))
    _one_clear_line(capsys.readouterr().err, "train tspin: step 1/")
    kept = load_file(str(out / "nonfinite-step-000001" / "model.safetensors"))
    initial = load_file(str(model / "model.safetensors"))
    assert rc == 1 and all(torch.equal(kept[k], initial[k]) for k in initial)
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()


def test_generate_keeps_its_own_output_and_refuses_to_overwrite_it_with_another_field(env, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    argv = _argv(env, tmp_path, f"generate {{base}} --out={out} --field=proto")
    assert main(argv) == 0
    before = out.read_text()
    assert main(argv) == 0 and out.read_text() == before  # its own output: kept (resumable)
    capsys.readouterr()
    assert main([*argv[:-1], "--field=sample"]) == 2  # the same file for another column: refused
    _one_clear_line(capsys.readouterr().err, "the file exists and is not this command's output")
    assert out.read_text() == before
    # the same column sampled another way (temperature, seed, ...) is not this run's output either: refused, naming
    # the keys, not handed back as if it were
    assert main([*argv, "--temperature=0.5", "--seed=3"]) == 2
    _one_clear_line(capsys.readouterr().err, "the file came from other settings (changed: temperature, seed; "
                                             "see g.jsonl.settings.json)")
    out.rename(tmp_path / "g.jsonl.partial")  # a killed run's batches: not continued with other settings
    assert main([*argv, "--top_k=3"]) == 2
    _one_clear_line(capsys.readouterr().err, "the unfinished samples in g.jsonl.partial came from other settings "
                                             "(changed: top_k;")
    (tmp_path / "g.jsonl.partial").unlink()
    assert main([*argv, "--top_k=3"]) == 0 and out.exists()  # nothing left of the old run: a fresh start


# ----------------------------------------------------------------------------- real processes
def _console(args: list[str], **kw) -> subprocess.CompletedProcess:
    exe = shutil.which("tspin") or f"{sys.prefix}/bin/tspin"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_console_script_missing_model(env, tmp_path):
    argv = _argv(env, tmp_path / "out", "train {base} --model_name_or_path=/nonexistent/model")
    r = _console(argv)
    assert r.returncode == 2
    _one_clear_line(r.stderr, "model_name_or_path='/nonexistent/model': no such directory")


def test_debug_raises_the_error_for_its_traceback(env, tmp_path):
    argv = _argv(env, tmp_path / "out", "train {base} --model_name_or_path=/nonexistent/model --debug")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main(argv)
    with pytest.raises(ValueError, match="beta=nan"):
        main(_argv(env, tmp_path / "out", "train {base} --beta=nan --debug"))


def test_console_script_full_disk_names_the_path(env, tmp_path):
    """A real failed write: a file-size limit (the kernel's EFBIG, as a full disk's ENOSPC) that the config and the
    metrics fit in and the saved model does not. One line naming the directory being written, exit 1, and no
    half-written model left in place."""
    out = tmp_path / "out"
    limit = 40_000  # the tiny model's weights are 70 kB

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    r = _console(_argv(env, out, "train {base} --method=sft"), preexec_fn=small_files)
    assert r.returncode == 1, r.stderr
    _one_clear_line(r.stderr, f"could not write {out / 'model'}: ")
    assert "File too large" in r.stderr and not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the temp folder went with the failure
    assert json.loads((out / "inputs.json").read_text())["data_path"]["count"] == 12
