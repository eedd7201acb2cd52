"""`tspin train` / `tspin iterate` under torchrun (2 gloo processes, CPU) against one process.

Each test launches the real console entry point (`-m tspin.cli`) the way a user would, with the same YAML recipe as
the single-process run it is compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_model_dir, tiny_policy, write_jsonl  # noqa: F401
from safetensors.torch import load_file

from tspin.config import save_config
from tspin.io import read_jsonl
from tspin.selfplay import train

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def torchrun(command: str, cfg, tmp: Path, *extra: str, nproc: int = 2, check: bool = True):
    recipe = tmp / f"{Path(cfg.output_dir).name}.yaml"
    save_config(cfg, recipe)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tspin.cli", command, "--config", str(recipe), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun tspin {command} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), hidden=32, layers=2, heads=2)


def _triplets(path: Path, n: int = 8) -> Path:
    words = ["dcba", "cab", "fed", "hgfe", "zyx", "qpo", "lkj", "nm", "utsr", "wv"][:n]
    return write_jsonl(path, [{"prompt_id": str(i), "prompt": f"sort {s}", "real": "".join(sorted(s)),
                               "generated": s, "proto": s[::-1]} for i, s in enumerate(words)])


@pytest.mark.parametrize("strategy,lora_rank,layout,method,fused_loss", [
    ("ddp", 0, "padded", "tspin", "true"), ("fsdp2", 0, "padded", "tspin", "true"),
    ("ddp", 4, "padded", "tspin", "true"), ("fsdp2", 4, "padded", "tspin", "true"),
    ("ddp", 0, "shared_prefix", "tspin", "true"), ("fsdp2", 4, "shared_prefix", "tspin", "true"),
    ("ddp", 0, "packed", "spin", "true"), ("ddp", 0, "padded", "tspin", "false")])
def test_train_under_torchrun_equals_one_process(model_dir, tmp_path, strategy, lora_rank, layout, method,
                                                 fused_loss):
    """2 ranks x 2 triplets per micro-batch take the steps of 1 process x 4 triplets: same weights at the end
    (with LoRA: rank 0's adapter init is broadcast, and it is the one-process init). The fused loss runs inside
    the LM head's forward, where DDP and FSDP2 see it; the one-process run takes the recompute path (fused_loss
    false), so each case also checks the fused path against it."""
    data = _triplets(tmp_path / "triplets.jsonl")
    common = dict(method=method, model_name_or_path=str(model_dir), data_path=str(data), learning_rate=1e-2,
                  loss_impl="torch", gradient_accumulation_steps=1, num_train_epochs=2.0, max_grad_norm=0.5,
                  lora_rank=lora_rank, lora_alpha=8.0, layout=layout)
    train(tiny_cfg(per_device_train_batch_size=4, output_dir=str(tmp_path / "one"), fused_loss="false", **common))
    common["fused_loss"] = fused_loss
    torchrun("train", tiny_cfg(per_device_train_batch_size=2, strategy=strategy, output_dir=str(tmp_path / "two"),
                               **common), tmp_path)
    name = "adapter_model.safetensors" if lora_rank else "model.safetensors"
    one, two = (load_file(str(tmp_path / d / "model" / name)) for d in ("one", "two"))
    base = load_file(str(model_dir / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        if "lora_B" in k:  # B starts at 0
            assert one[k].abs().max() > 0, f"{k} did not train"
        elif k in base and "norm" not in k:
            assert not torch.equal(one[k], base[k]), f"{k} did not train"
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-4, msg=k)  # Adam amplifies fp noise near 0
    m1, m2 = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [1, 2, 3, 4]  # rank 0 alone writes
    for a, b in zip(m1, m2):  # the logged loss / grad norm are those of the whole step, over both ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)


def test_iterate_under_torchrun_fsdp2_writes_the_run(model_dir, tmp_path):
    data = task_file(tmp_path / "task.jsonl", 14)
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data), eval_size=5,
                   num_iterations=1, loss_impl="torch", strategy="fsdp2", output_dir=str(tmp_path / "run"),
                   per_device_train_batch_size=2)
    torchrun("iterate", cfg, tmp_path)
    out = tmp_path / "run"
    for f in ("tspin-run.json", "config.yaml", "proto.jsonl", "eval_init.json", "iter0/data.jsonl",
              "iter0/model/model.safetensors", "iter0/model/trainer_state/state.json", "iter0/eval.json",
              "iter0/eval_generations.jsonl", "summary.json"):
        assert (out / f).exists(), f
    assert not list(out.rglob("*.partial")) and not (out / "iter0" / "checkpoints").exists() or not list(
        (out / "iter0" / "checkpoints").iterdir())
    proto = read_jsonl(out / "proto.jsonl")
    assert [p["prompt_id"] for p in proto] == [r["prompt_id"] for r in read_jsonl(out / "iter0" / "data.jsonl")]
    assert len(proto) == 9 and all(isinstance(p["proto"], str) for p in proto)  # every rank's share gathered
    summary = json.loads((out / "summary.json").read_text())
    assert [e["iteration"] for e in summary["evals"]] == [-1, 0] and summary["evals"][1]["eval/num_prompts"] == 5
    rows = read_jsonl(out / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if r["phase"] == "train"]
    assert train_steps == list(range(1, train_steps[-1] + 1))  # one line per step: rank 0 alone writes
    assert [r["iteration"] for r in rows if r["phase"] == "eval"] == [-1, 0]
    # --resume on the finished run loads iter0/model into the sharded policy and evaluates it again: same result
    (out / "iter0" / "eval.json").unlink()
    torchrun("iterate", cfg, tmp_path, "--resume")
    again = json.loads((out / "summary.json").read_text())
    assert again["evals"][1] == pytest.approx(summary["evals"][1])


def test_a_diverging_fsdp2_run_stops_at_the_same_step_on_every_rank(model_dir, tmp_path):
    """learning_rate=1e30 under torchrun with 2 FSDP2 ranks: every rank reads the same (reduced) flag and stops at
    the same step with its own one-line error; the weights before that step are saved once, finite, and no model/
    is written."""
    data = _triplets(tmp_path / "triplets.jsonl")
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data), learning_rate=1e30,
                   loss_impl="torch", strategy="fsdp2", per_device_train_batch_size=1, output_dir=str(tmp_path / "r"))
    proc = torchrun("train", cfg, tmp_path, check=False)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tspin train: error: [rank ")]
    assert sorted(x[len("tspin train: error: "):][:8] for x in lines) == ["[rank 0]", "[rank 1]"], proc.stderr[-3000:]
    steps = {x.split(": step ")[1].split("/")[0] for x in lines}
    assert len(steps) == 1, lines  # the same step on both ranks
    kept = tmp_path / "r" / f"nonfinite-step-{int(steps.pop()):06d}" / "model.safetensors"
    assert all(torch.isfinite(w).all() for w in load_file(str(kept)).values())
    assert not (tmp_path / "r" / "model").exists()


def test_ddp_without_a_launcher_is_a_clear_error(model_dir, tmp_path):
    data = _triplets(tmp_path / "triplets.jsonl")
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data), strategy="ddp",
                   output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="strategy='ddp' needs a process group: launch with torchrun"):
        train(cfg)


def test_iterate_spin_under_torchrun_stores_the_start_policys_reference_logps(model_dir, tmp_path):
    """SPIN under DDP: generation and reference log-probs are sharded over the ranks and gathered; every row's
    references must be the start-of-iteration policy's (iteration 0: the base model) log-probs of its texts."""
    from tspin.data import build_features
    from tspin.losses import batched_logps
    from tspin.models import load_tokenizer

    data = task_file(tmp_path / "task.jsonl", 9)
    cfg = tiny_cfg(method="spin", model_name_or_path=str(model_dir), data_path=str(data), num_iterations=1,
                   loss_impl="torch", strategy="ddp", output_dir=str(tmp_path / "run"), per_device_train_batch_size=2)
    torchrun("iterate", cfg, tmp_path)
    out = tmp_path / "run"
    rows = read_jsonl(out / "iter0" / "data.jsonl")
    assert len(rows) == 9 and len({r["prompt_id"] for r in rows}) == 9  # every rank's share, each prompt once
    assert all({"ref_real", "ref_generated"} <= set(r) for r in rows)
    tok = load_tokenizer(str(model_dir))
    feats = build_features(rows, tok, ("real", "generated"), template="paper", max_length=cfg.max_length,
                           max_prompt_length=cfg.max_prompt_length)
    lp = batched_logps(tiny_policy(model_dir), feats, ("real", "generated"),
                       tok.pad_token_id, batch_size=4)
    assert lp["real"] == pytest.approx([r["ref_real"] for r in rows], abs=1e-4)
    assert lp["generated"] == pytest.approx([r["ref_generated"] for r in rows], abs=1e-4)
    assert (out / "iter0" / "model" / "model.safetensors").exists()
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "train"]
    assert steps == list(range(1, steps[-1] + 1))
