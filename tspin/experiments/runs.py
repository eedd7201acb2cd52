"""The demo's and the study's runs for one seed, as jobs (:mod:`tspin.experiments.jobs`), all through the project's own
`tspin train` / `tspin iterate` / `tspin generate` code paths.

Layout under OUT (the demo: one seed; the study: several, plus the grid of seed 0)::

    data/{train,val,test,corpus,corpus_eval}.jsonl     shared by every seed (data/job.json)
    seed{s}/pretrain/      base model (init seed s) + causal-LM pretraining on the raw corpus
    seed{s}/sft25/         instruction SFT on 25%, epoch by epoch, early-stopped on validation -> pi_0 (OUT/best)
    seed{s}/sft100/        the same on 100%
    seed{s}/sft25_matched/ SFT on 25% for exactly the optimizer steps sft100 took to its chosen epoch
    seed{s}/proto/         y0: one sample per training prompt from pi_0, shared by every self-play run
    seed{s}/runs/<run>/    4 iterations of a method from pi_0 (evaluated on validation after each)
    seed{s}/test/<label>/  test evaluations of chosen models only (per-prompt outcomes for the paired tests)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import Config
from ..data import load_records
from ..io import atomic_path, atomic_write_jsonl, read_jsonl
from .jobs import Job

METHODS = ("tspin", "tspin_nohist", "spin", "sft25_cont")
COEF = {"tspin": "alpha", "tspin_nohist": "alpha", "spin": "spin_lambda"}  # each method's grid coefficient


def demo_config(**overrides) -> Config:
    """The demo's shared settings (tiny model, short strings, CPU) + `overrides`, validated."""
    base = dict(prompt_template="paper", max_length=40, max_prompt_length=24, max_new_tokens=10,
                eval_max_new_tokens=10, temperature=1.0, top_p=1.0, generation_batch_size=256, eval_batch_size=256,
                per_device_train_batch_size=32, gradient_accumulation_steps=1, optimizer="adamw", weight_decay=0.0,
                lr_scheduler="linear", warmup_ratio=0.1, max_grad_norm=1.0, loss_impl="auto", seed=0, data_seed=0,
                logging_steps=5, device="cpu", alpha=1.0, beta=0.1, beta_iter0=0.0, spin_lambda=0.1)
    base.update(overrides)
    return Config(**base).validate()


def run_name(method: str, params: dict) -> str:
    """A run's directory name from its method and settings, e.g. ``tspin_lr2e-05_alpha1``."""
    parts = [method, f"lr{params['learning_rate']:g}"]
    if method in COEF:
        parts.append(f"{COEF[method].split('_')[-1]}{params[COEF[method]]:g}")
    return "_".join(parts)


def _cfg(s: dict, data: Path, seed: int, progress: bool, backend: str = "hf", **kw) -> Config:
    """A stage's config: training data and validation prompts of `data`, unless `kw` says otherwise; `backend`
    samples (generation_backend)."""
    base = dict(seed=seed, progress=progress, generation_backend=backend, data_path=str(data / "train.jsonl"),
                eval_data_path=str(data / "val.jsonl"), logging_steps=25, temperature=s["temperature"])
    return demo_config(**{**base, **kw})


# ----------------------------------------------------------------------------- job functions
def make_data(*, out: str, s: dict) -> dict:
    from .task import make_corpus, make_splits

    out = Path(out)
    kw = dict(min_len=s["min_len"], max_len=s["max_len"])
    splits = make_splits(s["n_train"], s["n_val"], s["n_test"], seed=1, **kw)
    for name, rows in splits.items():
        atomic_write_jsonl(out / f"{name}.jsonl", rows)
    held = {r["prompt"] for r in splits["val"] + splits["test"]}
    atomic_write_jsonl(out / "corpus.jsonl", make_corpus(s["n_corpus"], seed=11, exclude=held, **kw))
    atomic_write_jsonl(out / "corpus_eval.jsonl", make_corpus(s["n_corpus_eval"], seed=12, exclude=held, **kw))
    return {k: len(v) for k, v in splits.items()}


def pretrain(*, out: str, data: str, s: dict, seed: int, progress: bool = False, backend: str = "hf") -> dict:
    """Base model (init seed `seed`) + causal-LM training on the raw corpus (template ``{prompt}``)."""
    from ..selfplay import train
    from .task import build_model, build_tokenizer

    out, data = Path(out), Path(data)
    if not (out / "base" / "config.json").exists():
        tok = build_tokenizer()
        model = build_model(tok, seed=seed, **s["model"])
        with atomic_path(out / "base") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    p = s["pretrain"]
    cfg = _cfg(s, data, seed, progress, backend, method="sft", model_name_or_path=str(out / "base"),
               data_path=str(data / "corpus.jsonl"), eval_data_path=str(data / "corpus_eval.jsonl"),
               prompt_template="{prompt}", learning_rate=p["lr"], num_train_epochs=p["epochs"],
               per_device_train_batch_size=p["batch_size"], lr_scheduler="cosine", warmup_ratio=0.05,
               output_dir=str(out / "run"))
    r = train(cfg, resume=True)
    return {"model": str(out / "run" / "model"), **{k: v for k, v in r.items() if k.startswith("eval/")}}


def _evals(summary: dict) -> list[float]:
    return [e["eval/exact_match"] for e in summary["evals"] if e["iteration"] >= 0]


def _sft_rounds(out: str, data: str, s: dict, seed: int, model: str, fraction: float | None, rounds: int,
                progress: bool, steps_per_round: int | None = None, backend: str = "hf") -> list[float]:
    """`rounds` rounds of instruction SFT (``tspin iterate --method=sft``), each one epoch (or `steps_per_round`
    optimizer steps) at a constant learning rate, evaluated on validation after each; resumes, so rounds can be
    added. (Each round starts a fresh AdamW; at a constant rate and with bias correction that changes little.)"""
    from ..selfplay import iterate

    epochs = 1.0
    if steps_per_round is not None:
        n = s["n_train"] if fraction is None else round(fraction * s["n_train"])
        per_epoch = math.ceil(n / demo_config().per_device_train_batch_size)
        epochs = steps_per_round / per_epoch
        assert math.ceil(per_epoch * epochs) == steps_per_round  # the trainer takes exactly that many steps
    cfg = _cfg(s, Path(data), seed, progress, backend, method="sft", model_name_or_path=model, data_fraction=fraction,
               learning_rate=s["sft"]["lr"], lr_scheduler="constant", warmup_ratio=0.0, num_train_epochs=epochs,
               num_iterations=rounds, output_dir=out)
    return _evals(iterate(cfg, resume=True))


def sft_early_stopped(*, out: str, data: str, s: dict, seed: int, model: str, fraction: float | None,
                      progress: bool = False, backend: str = "hf") -> dict:
    """Instruction SFT epoch by epoch, stopped `patience` epochs after the best validation exact match (at most
    `max_epochs`); the best epoch's model, copied to OUT/best, is the result."""
    f = s["sft"]
    for epochs in range(1, f["max_epochs"] + 1):
        ems = _sft_rounds(out, data, s, seed, model, fraction, epochs, progress, backend=backend)
        best = ems.index(max(ems))
        if len(ems) - 1 - best >= f["patience"]:
            break
    n = s["n_train"] if fraction is None else round(fraction * s["n_train"])
    steps = math.ceil(n / demo_config().per_device_train_batch_size)
    return {"model": _keep_model(Path(out) / f"iter{best}", Path(out) / "best"), "best_epoch": best + 1,
            "val_exact_match": ems, "steps_per_epoch": steps, "steps_to_best": steps * (best + 1)}


def _keep_model(round_dir: Path, dest: Path) -> str:
    """Copy a round's model to `dest`, a path that does not depend on which round it was."""
    import shutil

    if not dest.exists():
        with atomic_path(dest) as tmp:
            shutil.copytree(round_dir / "model", tmp)
    return str(dest)


def sft_matched(*, out: str, data: str, s: dict, seed: int, model: str, reference: str,
                progress: bool = False, backend: str = "hf") -> dict:
    """SFT on 25% for exactly the optimizer steps the `reference` SFT-100 job took to its chosen epoch, in rounds
    of its steps per epoch, no early stopping: the control that tells "more annotations" from "more steps"."""
    ref = json.loads((Path(reference) / "job.json").read_text())
    ems = _sft_rounds(out, data, s, seed, model, 0.25, ref["best_epoch"], progress, ref["steps_per_epoch"],
                      backend)
    return {"model": _keep_model(Path(out) / f"iter{ref['best_epoch'] - 1}", Path(out) / "final"),
            "val_exact_match": ems, "steps": ref["steps_to_best"]}


def proto(*, out: str, data: str, s: dict, seed: int, pi0: str, progress: bool = False, backend: str = "hf") -> dict:
    """y0 for every training prompt of the 25% subset, sampled once by pi_0 (``tspin generate --field=proto``)."""
    from ..selfplay import generate

    cfg = _cfg(s, Path(data), seed, progress, backend, method="tspin", model_name_or_path=pi0, data_fraction=0.25,
               output_dir=out)
    path = generate(cfg, str(Path(out) / "proto.jsonl"), field="proto")
    return {"proto": str(path), "y_eq_real": _match_rate(read_jsonl(path), "proto")}


def _match_rate(rows: list[dict], field: str) -> float:
    from ..evaluation import _normalize

    return sum(_normalize(r[field]) == _normalize(r["real"]) for r in rows) / max(len(rows), 1)


def selfplay_config(*, out: str, data: str, s: dict, seed: int, pi0: str, proto_path: str | None, method: str,
                    params: dict, progress: bool = False, backend: str = "hf") -> Config:
    """The `tspin iterate` config of a self-play run (or of SFT continued: method sft25_cont)."""
    kw = dict(method=method, no_history=False)
    if method == "tspin_nohist":
        kw.update(method="tspin", no_history=True)
    elif method == "sft25_cont":
        kw.update(method="sft")
    if method == "spin":
        kw.update(spin_mix_previous=s["spin_mix_previous"])
    return _cfg(s, Path(data), seed, progress, backend, model_name_or_path=pi0, data_fraction=0.25,
                num_iterations=s["iterations"], num_train_epochs=s["selfplay_epochs"], beta=s["beta"],
                proto_path=proto_path if kw["method"] != "sft" else None, output_dir=out, **kw, **params)


def selfplay(**kw) -> dict:
    """`iterations` rounds of a method from pi_0 on the 25% subset (``tspin iterate``), validation after each;
    keywords as :func:`selfplay_config`."""
    from ..selfplay import iterate

    cfg = selfplay_config(**kw)
    out, iterations = Path(cfg.output_dir), cfg.num_iterations
    summary = iterate(cfg, resume=True)
    y_eq = [_match_rate(read_jsonl(out / f"iter{t}" / "data.jsonl"), "generated")
            for t in range(iterations)] if cfg.method != "sft" else None
    train = [{k: v for k, v in e.items() if k.startswith("train/")} for e in summary["evals"] if e["iteration"] >= 0]
    return {"val_exact_match": [e["eval/exact_match"] for e in summary["evals"]], "y_eq_real": y_eq,
            "train": train, "models": [str(out / f"iter{t}" / "model") for t in range(iterations)]}


def test_eval(*, out: str, data: str, s: dict, models: dict[str, str], backend: str = "hf") -> dict:
    """Greedy evaluation of `models` ({label: model dir}) on the test prompts: metrics per label, and per-prompt
    outcomes in OUT/<label>.jsonl for the paired tests."""
    from ..evaluation import evaluate
    from ..models import load_policy, load_tokenizer

    test = load_records(Path(data) / "test.jsonl")
    result = {}
    for label, model in models.items():
        cfg = demo_config(model_name_or_path=model, progress=False, generation_backend=backend)
        path = Path(out) / f"{label.replace('/', '__')}.jsonl"
        result[label] = evaluate(load_policy(cfg), load_tokenizer(model), test, cfg, path, weights=model)
    return result


def read_outcomes(test_dir: Path, label: str) -> list[bool]:
    """Per-prompt exact-match outcomes of `label`, in test-file order."""
    return [r["exact"] for r in read_jsonl(Path(test_dir) / f"{label.replace('/', '__')}.jsonl")]


# ----------------------------------------------------------------------------- the jobs of one seed
def data_job(out: Path, s: dict) -> Job:
    return Job("data", "tspin.experiments.runs:make_data", out / "data", dict(out=str(out / "data"), s=s))


def seed_jobs(out: Path, s: dict, seed: int, runs: dict[str, list[dict]], *, progress: bool = False,
              test_runs: dict[str, dict] | None = None, backend: str = "hf") -> list[Job]:
    """The jobs of one seed: pretraining, the SFT runs, the proto, the self-play `runs` ({method: [params, ...]})
    and, when `test_runs` ({method: params}: the chosen settings) is given, test evaluations of the SFT models and of
    those runs. Without it nothing touches the test prompts (the study's grid phase). `backend` samples and
    answers greedily in every job (generation_backend: hf or vllm)."""
    d, data, tag = out / f"seed{seed}", str(out / "data"), f"seed{seed}"
    base = dict(data=data, s=s, seed=seed, progress=progress, backend=backend)
    pretrained = str(d / "pretrain" / "run" / "model")
    pi0 = str(d / "sft25" / "best")

    def job(name, fn, deps, **kw):
        return Job(f"{tag}/{name}", f"tspin.experiments.runs:{fn}", d / name, dict(out=str(d / name), **kw),
                   tuple(f"{tag}/{x}" if x != "data" else x for x in deps))

    jobs = [job("pretrain", "pretrain", ["data"], **base),
            job("sft25", "sft_early_stopped", ["pretrain"], model=pretrained, fraction=0.25, **base),
            job("sft100", "sft_early_stopped", ["pretrain"], model=pretrained, fraction=None, **base),
            job("sft25_matched", "sft_matched", ["sft100"], model=pretrained, reference=str(d / "sft100"), **base),
            job("proto", "proto", ["sft25"], pi0=pi0, **base)]
    for method, grid in runs.items():
        for params in grid:
            jobs.append(job(f"runs/{run_name(method, params)}", "selfplay",
                            ["sft25" if method == "sft25_cont" else "proto"], pi0=pi0, method=method, params=params,
                            proto_path=str(d / "proto" / "proto.jsonl"), **base))
    if test_runs is None:
        return jobs
    jobs.append(job("test/sft", "test_eval", ["sft25", "sft100", "sft25_matched"], data=data, s=s, backend=backend,
                    models={"pi_0": pi0, "sft100": str(d / "sft100" / "best"),
                            "sft25_matched": str(d / "sft25_matched" / "final")}))
    for method, params in test_runs.items():
        run = d / "runs" / run_name(method, params)
        jobs.append(job(f"test/{method}", "test_eval", [f"runs/{run_name(method, params)}"], data=data, s=s,
                        backend=backend,
                        models={f"{method}/iter{t}": str(run / f"iter{t}" / "model")
                                for t in range(s["iterations"])}))
    return jobs
