"""Training loop and self-play loop on a real tiny Llama: exact gradient accumulation, schedules, metrics names,
and a 2-iteration `iterate` smoke for T-SPIN and SPIN."""

import json
import math

import pytest
import torch
from _trainer_helpers import one_thread, task_file, tiny_cfg, tiny_model_dir, tiny_policy  # noqa: F401 (autouse)

from tspin.data import build_features, load_records
from tspin.io import read_jsonl
from tspin.metrics import MetricsWriter
from tspin.models import load_policy, load_tokenizer
from tspin.selfplay import iterate
from tspin.settings import load_settings, train_settings
from tspin.state_file import read_state
from tspin.train import build_optimizer, build_scheduler, train_loop

TSPIN_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "logps/real", "logps/generated", "logps/proto",
              "rewards/real", "rewards/generated", "rewards/proto", "rewards/margins", "rewards/accuracies",
              "margins/current", "margins/history"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"), hidden=32, layers=1, heads=2)


def _feats(tok, n, fields=("real", "generated", "proto")):
    from tspin.experiments.demo import make_task

    recs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"],
             "generated": r["response"][1:], "proto": r["response"][::-1] + "ab"} for r in make_task(n, 4)]
    return build_features(recs, tok, fields, template="paper", max_length=40, max_prompt_length=24)


@pytest.mark.parametrize("method", ["sft", "tspin"])
def test_gradient_accumulation_is_exact(model_dir, tmp_path, method):
    tok = load_tokenizer(str(model_dir))
    fields = ("real",) if method == "sft" else ("real", "generated", "proto")
    feats = _feats(tok, 16, fields)  # responses of different lengths: token normalisation must span the window
    finals = []
    for mb, acc in ((8, 1), (2, 4)):
        model = tiny_policy(model_dir)
        cfg = tiny_cfg(per_device_train_batch_size=mb, gradient_accumulation_steps=acc, learning_rate=1e-2,
                       max_grad_norm=None, warmup_ratio=0.0)
        train_loop(model, tok, feats, train_settings(cfg), method=method, out_dir=tmp_path / f"{mb}", iteration=1,
                   metrics=MetricsWriter(tmp_path / f"m{mb}.jsonl"))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        losses = [r["loss"] for r in read_jsonl(tmp_path / f"m{mb}.jsonl")]
        if mb == 8:
            first = losses
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)
    assert losses == pytest.approx(first, rel=1e-4)


def _documented_lr(kind: str, step: int, total: int, warmup: int) -> float:
    """The schedule the README documents: warmup (step+1)/(w+1), then linear / cosine decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1.0 - progress)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total, ratio", [(110, 0.1), (7, 0.0), (1, 0.1), (40, 0.5)])
def test_schedules_follow_the_documented_formula(kind, total, ratio):
    settings = train_settings(tiny_cfg(lr_scheduler=kind, warmup_ratio=ratio, learning_rate=1.0, optimizer="rmsprop"))
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), settings,
                            total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    warmup = int(ratio * total)
    assert lrs == pytest.approx([_documented_lr(kind, s, total, warmup) for s in range(total)], rel=1e-12, abs=1e-15)
    if total == 110:  # 11 warmup steps: the first step already learns, step 11 is the peak
        assert lrs[0] == pytest.approx(1 / 12) and lrs[10] < 1 and lrs[11] == 1.0


def test_optimizers():
    for name, kind in (("rmsprop", torch.optim.RMSprop), ("adamw", torch.optim.AdamW)):
        assert isinstance(build_optimizer(torch.nn.Linear(1, 1), train_settings(tiny_cfg(optimizer=name))), kind)


def test_sft_loss_goes_down_and_metrics_have_spec_names(model_dir, tmp_path):
    tok = load_tokenizer(str(model_dir))
    model = tiny_policy(model_dir)
    cfg = tiny_cfg(num_train_epochs=8, learning_rate=1e-2, per_device_train_batch_size=8)
    train_loop(model, tok, _feats(tok, 16, ("real",)), train_settings(cfg), method="sft", out_dir=tmp_path / "s",
               metrics=MetricsWriter(tmp_path / "s.jsonl"))
    losses = [r["loss"] for r in read_jsonl(tmp_path / "s.jsonl")]
    assert losses[-1] < 0.8 * losses[0]
    # the finished policy keeps the step and the RNG states, not the optimizer's moments (2x the weights)
    state = read_state(tmp_path / "s" / "model" / "trainer_state")
    assert state["step"] == state["total_steps"] and "rng" in state
    assert "optimizer" not in state and "scheduler" not in state
    weights = (tmp_path / "s" / "model" / "model.safetensors").stat().st_size
    assert (tmp_path / "s" / "model" / "trainer_state" / "tensors.safetensors").stat().st_size < weights / 4

    model = tiny_policy(model_dir)
    train_loop(model, tok, _feats(tok, 8), train_settings(tiny_cfg()), method="tspin", out_dir=tmp_path / "t",
               iteration=1, metrics=MetricsWriter(tmp_path / "t.jsonl"))
    row = read_jsonl(tmp_path / "t.jsonl")[-1]
    assert TSPIN_KEYS <= set(row) and row["beta"] == 0.1 and row["phase"] == "train"


def test_iterate_two_iterations_tspin(model_dir, tmp_path):
    data = task_file(tmp_path / "train.jsonl", 24)
    held = task_file(tmp_path / "eval.jsonl", 8, seed=2)
    cfg = tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data),
                   eval_data_path=str(held), data_fraction=0.5, num_iterations=2, output_dir=str(tmp_path / "run"))
    summary = iterate(cfg)
    out = tmp_path / "run"
    assert [e["iteration"] for e in summary["evals"]] == [-1, 0, 1]
    assert all(0 <= e["eval/exact_match"] <= 1 for e in summary["evals"])
    assert all("train/margins/history" in e for e in summary["evals"][1:])
    assert json.loads((out / "summary.json").read_text()) == summary
    proto = load_records(out / "proto.jsonl")
    assert len(proto) == 12
    d0, d1 = read_jsonl(out / "iter0" / "data.jsonl"), read_jsonl(out / "iter1" / "data.jsonl")
    assert [r["generated"] for r in d0] == [r["proto"] for r in d0]  # iteration 0's y' is pi_0's sample
    assert not (out / "iter0" / "generated.jsonl").exists() and (out / "iter1" / "generated.jsonl").exists()
    assert [r["proto"] for r in d1] == [r["proto"] for r in proto]  # y0 is reused, y' is fresh
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if r["phase"] == "train"]
    assert {r["beta"] for r in train if r["iteration"] == 0} == {0.0}
    assert {r["beta"] for r in train if r["iteration"] == 1} == {0.1}
    assert all(TSPIN_KEYS <= set(r) for r in train)
    assert len([r for r in rows if r["phase"] == "eval"]) == 3
    for t in (0, 1):
        assert (out / f"iter{t}" / "model" / "model.safetensors").exists()
        assert not list((out / f"iter{t}" / "checkpoints").glob("step-*"))
    with pytest.raises(FileExistsError, match="--resume"):
        iterate(cfg)
    with pytest.raises(ValueError, match=r"config differs .* in learning_rate \(0.001 -> 0.002\)"):
        iterate(tiny_cfg(**{**cfg.to_dict(), "learning_rate": 2e-3}), resume=True)
    # resuming a finished run with more iterations continues it
    assert [e["iteration"] for e in iterate(tiny_cfg(**{**cfg.to_dict(), "num_iterations": 3}), resume=True)
            ["evals"]] == [-1, 0, 1, 2]


def test_iterate_spin_with_mixing_stores_reference_logps(model_dir, tmp_path):
    data = task_file(tmp_path / "train.jsonl", 8)
    cfg = tiny_cfg(method="spin", model_name_or_path=str(model_dir), data_path=str(data), num_iterations=2,
                   spin_mix_previous=True, output_dir=str(tmp_path / "run"))
    summary = iterate(cfg)
    assert [e["iteration"] for e in summary["evals"]] == [0, 1]  # no held-out data: training diagnostics only
    assert all("train/rewards/margins" in e and not any(k.startswith("eval/") for k in e) for e in summary["evals"])
    d1 = read_jsonl(tmp_path / "run" / "iter1" / "data.jsonl")
    assert all({"ref_real", "ref_generated", "ref_generated_prev", "generated_prev"} <= set(r) for r in d1)
    # the references are the start-of-iteration policy's (iteration 0's final model) log-probs
    tok = load_tokenizer(str(model_dir))
    model = tiny_policy(tmp_path / "run" / "iter0" / "model")
    from tspin.losses import batched_logps

    feats = build_features(d1, tok, ("real", "generated"), template="paper", max_length=40, max_prompt_length=24)
    lp = batched_logps(model, feats, ("real", "generated"), tok.pad_token_id, batch_size=4)
    assert lp["real"] == pytest.approx([r["ref_real"] for r in d1], abs=1e-4)
    assert lp["generated"] == pytest.approx([r["ref_generated"] for r in d1], abs=1e-4)
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    # mixing doubles iteration 1's pairs: 16 pairs / batch 4 = 4 steps, against 2 at iteration 0
    assert max(r["total_steps"] for r in train if r["iteration"] == 1) == 4
    assert max(r["total_steps"] for r in train if r["iteration"] == 0) == 2


@pytest.mark.parametrize("option", [{"layout": "packed"}, {"gradient_checkpointing": True}])
def test_packed_layout_and_checkpointing_train_like_the_plain_path(model_dir, tmp_path, option):
    tok = load_tokenizer(str(model_dir))
    feats = _feats(tok, 8)
    finals = []
    for name, opts in (("plain", {}), ("opt", option)):
        cfg = tiny_cfg(learning_rate=1e-2, model_name_or_path=str(model_dir), **opts)
        model = load_policy(load_settings(cfg))  # the trainer's policy: checkpointing is switched on before wrapping
        layer = model.model.model.layers[0]
        assert layer.gradient_checkpointing == bool(opts.get("gradient_checkpointing"))
        train_loop(model, tok, feats, train_settings(cfg), method="tspin", out_dir=tmp_path / name, iteration=1,
                   metrics=MetricsWriter(tmp_path / f"{name}.jsonl"))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-3, atol=1e-4)  # Adam amplifies fp noise near 0


def test_train_command_tspin_file_and_spin_with_computed_refs(model_dir, tmp_path):
    from tspin.selfplay import train

    rows = [{"prompt_id": str(i), "prompt": f"sort {s}", "real": "".join(sorted(s)), "generated": s, "proto": s[::-1]}
            for i, s in enumerate(["dcba", "cab", "fed", "hgfe"])]
    data = tmp_path / "triplets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = train(tiny_cfg(method="tspin", model_name_or_path=str(model_dir), data_path=str(data),
                       output_dir=str(tmp_path / "t")))
    assert r["model"].endswith("model") and (tmp_path / "t" / "model" / "model.safetensors").exists()
    r = train(tiny_cfg(method="spin", model_name_or_path=str(model_dir), data_path=str(data),
                       output_dir=str(tmp_path / "s")))
    refs = read_jsonl(tmp_path / "s" / "data_with_refs.jsonl")
    assert all(isinstance(x["ref_real"], float) and isinstance(x["ref_generated"], float) for x in refs)
    train_rows = [x for x in read_jsonl(tmp_path / "s" / "metrics.jsonl") if x["phase"] == "train"]
    # the first step starts from the reference policy itself: SPIN's rewards are exactly 0 there
    assert train_rows[0]["rewards/real"] == pytest.approx(0, abs=1e-5)
