"""scripts/gpu_loop.py, the one-GPU run of the whole loop, dry-run on CPU at a toy shape: every part it runs here
runs as it would on the GPU (own process, checks, phases), and its results file says what ran and how long each
phase took. (The vLLM part's dry run is in tests/test_generation_vllm.py, where vLLM is installed.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_loop.py"
TOY = ["--device", "cpu", "--shape", "toy", "--prompts", "8", "--eval-prompts", "3", "--max-new-tokens", "6",
       "--eval-max-new-tokens", "4", "--batch-size", "4", "--trainer-steps", "2"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT),
           "HOME": str(Path.home())}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_of_iterate_and_trainer_parts(tmp_path):
    out = tmp_path / "loop.json"
    proc = run(*TOY, "--parts", "iterate-hf,trainer", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["provenance"]["device"] == "cpu" and res["provenance"]["commit"]
    assert res["settings"]["shape"] == "toy" and list(res["parts"]) == ["iterate-hf", "trainer"]
    hf = res["parts"]["iterate-hf"]
    assert hf["status"] == "ok" and hf["losses_finite"] and hf["weights_changed"]
    assert set(hf["phases"]) == {"start", "iter0", "iter1"}
    assert set(hf["phases"]["iter1"]) == {"sample", "train", "checkpoint", "eval"}
    # the iteration's seconds are its phases' seconds; every sample ran to max_new_tokens (8 prompts x 6 x 2 iters)
    assert hf["iteration_seconds"]["iter1"] == pytest.approx(sum(p["seconds"] for p in hf["phases"]["iter1"].values()),
                                                             abs=1e-2)
    assert hf["sampled_tokens"] == 8 * 6 * 2 and hf["sampling_tokens_per_s"] > 0
    trainer = res["parts"]["trainer"]
    assert trainer["status"] == "ok" and len(trainer["losses"]) == 2 and trainer["weights_changed"]
    assert "rewards/margins" in trainer["metrics_logged"]
    assert res["comparison"]["met"] is None  # no vLLM part ran: no verdict
    assert out.with_suffix(".png").stat().st_size > 0
    assert "iterate-hf" in proc.stdout and "results:" in proc.stdout


def test_the_trainer_part_alone_says_what_it_needs(tmp_path):
    out = tmp_path / "loop.json"
    proc = run(*TOY, "--parts", "trainer", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = json.loads(out.read_text())["parts"]["trainer"]
    assert part["status"] == "skipped" and "iterate-hf" in part["reason"]


@pytest.mark.parametrize("args, fragment", [
    (["--parts", "iterate-hf,nope"], "--parts: unknown nope"),
    (["--prompts", "0"], "--prompts: expected a positive integer"),
    (["--shape", "llama-70b"], "--shape: invalid choice"),
    (["--device", "tpu"], "--device: expected cuda or cpu"),
])
def test_bad_arguments_are_clear_errors(args, fragment):
    proc = run(*args, timeout=120)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    proc = run("--work", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and "Traceback" not in proc.stderr
