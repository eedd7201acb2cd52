"""The demo's and the study's runs, as jobs (:mod:`tspin.experiments.jobs`), all through the project's own
`tspin train` / `tspin iterate` / `tspin generate` code paths.

Layout under OUT (the demo: one seed; the study: several, plus the grid on seed 0's validation prompts)::

    corpus/{corpus,corpus_eval}.jsonl  the raw pretraining documents (shared)
    pretrain/              the base model + causal-LM pretraining on the corpus (shared: one base, as in the paper)
    seed{s}/data/          the seed's own instruction prompts: {train,val,test}.jsonl
    seed{s}/pi0/           instruction SFT on 100%, epoch by epoch, early-stopped on validation -> pi_0 (OUT/best)
    seed{s}/proto/         y0: one sample per prompt of the seed's 25% subset from pi_0, shared by every run
    seed{s}/runs/<run>/    self-play from pi_0 on the 25% (evaluated on validation after each iteration), or SFT
                           continued from pi_0 on 100% for the same optimizer steps (sft_cont_lr..)
    seed{s}/pt_sft25/, pt_proto/, runs/pt_tspin_..  the extra from-pretrained arm: pi_0' = SFT on the 25% from the
                           pretrained model (early-stopped), its proto, T-SPIN from it
    seed{s}/test/<group>/  test evaluations of chosen models only (per-prompt outcomes for the paired tests)
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import Config
from ..data import load_records
from ..io import atomic_path, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from .jobs import Job
from .task import ANSWER_PATTERN

METHODS = ("tspin", "tspin_nohist", "spin", "sft_cont")  # the main study's arms from pi_0
SELFPLAY = ("tspin", "tspin_nohist", "spin")
COEF = {"tspin": "alpha", "tspin_nohist": "alpha", "spin": "spin_lambda"}  # each method's grid coefficient


def demo_config(**overrides) -> Config:
    """The demo's shared settings (tiny model, chained string operations, CPU; exact match over the step results,
    :data:`.task.ANSWER_PATTERN`) + `overrides`, validated."""
    base = dict(prompt_template="paper", max_length=60, max_prompt_length=20, max_new_tokens=40,
                eval_max_new_tokens=40, temperature=1.0, top_p=1.0, generation_batch_size=256, eval_batch_size=256,
                per_device_train_batch_size=32, gradient_accumulation_steps=1, optimizer="adamw", weight_decay=0.0,
                lr_scheduler="linear", warmup_ratio=0.1, max_grad_norm=1.0, loss_impl="auto", seed=0, data_seed=0,
                logging_steps=5, device="cpu", alpha=1.0, beta=0.1, beta_iter0=0.0, spin_lambda=0.1,
                eval_answer_pattern=ANSWER_PATTERN)
    base.update(overrides)
    return Config(**base).validate()


def run_name(method: str, params: dict) -> str:
    """A run's directory name from its method and settings, e.g. ``tspin_lr2e-05_alpha1``."""
    parts = [method, f"lr{params['learning_rate']:g}"]
    coef = COEF.get(method.removeprefix("pt_"))
    if coef:
        parts.append(f"{coef.split('_')[-1]}{params[coef]:g}")
    return "_".join(parts)


def n_prompts(s: dict, fraction: float | None) -> int:
    """How many training prompts a stage trains on: `fraction` of them (the 25% subset), or all (None)."""
    return s["n_train"] if fraction is None else round(fraction * s["n_train"])


def steps_per_epoch(s: dict, fraction: float | None) -> int:
    """Optimizer steps of one epoch over the training prompts (`fraction` of them; None: all)."""
    return math.ceil(n_prompts(s, fraction) / demo_config().per_device_train_batch_size)


def selfplay_steps(s: dict) -> int:
    """Optimizer steps of one self-play iteration: `selfplay_epochs` of an epoch over the 25% subset."""
    return math.ceil(s["selfplay_epochs"] * steps_per_epoch(s, s["fraction"]))


def _cfg(s: dict, data: Path, seed: int, progress: bool, backend: str = "hf", **kw) -> Config:
    """A stage's config: the seed's training data and validation prompts, its 25% subset (data_seed = seed),
    unless `kw` says otherwise; `backend` samples (generation_backend)."""
    base = dict(seed=seed, data_seed=seed, progress=progress, generation_backend=backend,
                data_path=str(data / "train.jsonl"), eval_data_path=str(data / "val.jsonl"), logging_steps=25,
                temperature=s["temperature"])
    return demo_config(**{**base, **kw})


# ----------------------------------------------------------------------------- job functions
def make_corpus_files(*, out: str, s: dict) -> dict:
    """The raw pretraining corpus (shared by every seed; its strings never start an instruction prompt)."""
    from .task import make_corpus

    out, c = Path(out), s["corpus"]
    atomic_write_jsonl(out / "corpus.jsonl", make_corpus(s["n_corpus"], seed=11, **c))
    atomic_write_jsonl(out / "corpus_eval.jsonl", make_corpus(s["n_corpus_eval"], seed=12, **c))
    return {"corpus": s["n_corpus"], "corpus_eval": s["n_corpus_eval"]}


def make_seed_data(*, out: str, s: dict, seed: int) -> dict:
    """The seed's own instruction prompts: training, validation and test splits drawn with the seed."""
    from .task import make_chain_splits

    splits = make_chain_splits(s["n_train"], s["n_val"], s["n_test"], seed=seed, **s["task"])
    for name, rows in splits.items():
        atomic_write_jsonl(Path(out) / f"{name}.jsonl", rows)
    return {k: len(v) for k, v in splits.items()}


def pretrain(*, out: str, corpus: str, s: dict, progress: bool = False, backend: str = "hf") -> dict:
    """Base model (init seed 0) + causal-LM training on the raw corpus (template ``{prompt}``)."""
    from ..selfplay import train
    from .task import build_model, build_tokenizer

    out, corpus = Path(out), Path(corpus)
    if not (out / "base" / "config.json").exists():
        tok = build_tokenizer()
        model = build_model(tok, seed=0, **s["model"])
        with atomic_path(out / "base") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    p = s["pretrain"]
    cfg = _cfg(s, corpus, 0, progress, backend, method="sft", model_name_or_path=str(out / "base"),
               data_path=str(corpus / "corpus.jsonl"), eval_data_path=str(corpus / "corpus_eval.jsonl"),
               prompt_template="{prompt}", learning_rate=p["lr"], num_train_epochs=p["epochs"],
               per_device_train_batch_size=p["batch_size"], lr_scheduler="cosine", warmup_ratio=0.05,
               output_dir=str(out / "run"))
    r = train(cfg, resume=True)
    return {"model": str(out / "run" / "model"), **{k: v for k, v in r.items() if k.startswith("eval/")}}


def _evals(summary: dict) -> list[float]:
    return [e["eval/exact_match"] for e in summary["evals"] if e["iteration"] >= 0]


def round_epochs(s: dict, fraction: float | None) -> float:
    """One SFT round as a fraction of an epoch over the training prompts (`fraction` of them; None: all):
    `round_examples` examples whatever the data size (so that patience means as many steps for pi_0 on 100% as for
    pi_0' on 25%), or one epoch when that is None."""
    if s["sft"]["round_examples"] is None:
        return 1.0
    return s["sft"]["round_examples"] / n_prompts(s, fraction)


def round_steps(s: dict, fraction: float | None) -> int:
    """Optimizer steps of one SFT round (the trainer takes ceil(epochs x steps per epoch))."""
    return math.ceil(round_epochs(s, fraction) * steps_per_epoch(s, fraction))


def _sft_rounds(out: str, data: str, s: dict, seed: int, model: str, fraction: float | None, rounds: int,
                progress: bool, backend: str = "hf") -> list[float]:
    """`rounds` rounds of instruction SFT (``tspin iterate --method=sft``), each :func:`round_epochs` of an epoch
    at a constant learning rate (each round its own shuffle of the data), evaluated on validation after each;
    resumes, so rounds can be added. (Each round starts a fresh AdamW; at a constant rate and with bias correction
    that changes little.)"""
    from ..selfplay import iterate

    cfg = _cfg(s, Path(data), seed, progress, backend, method="sft", model_name_or_path=model, data_fraction=fraction,
               learning_rate=s["sft"]["lr"], lr_scheduler="constant", warmup_ratio=0.0,
               num_train_epochs=round_epochs(s, fraction), num_iterations=rounds, output_dir=out)
    return _evals(iterate(cfg, resume=True))


def sft_early_stopped(*, out: str, data: str, s: dict, seed: int, model: str, fraction: float | None,
                      progress: bool = False, backend: str = "hf") -> dict:
    """Instruction SFT round by round (:func:`round_epochs`) at a constant rate, stopped `patience` rounds after the
    best validation exact match (at most `max_rounds`, a cap that should not bind: ``stopped_by`` says which ended
    it); then `cooldown_rounds` rounds more from the best round's model with the rate decaying linearly to 0 (the
    pilots: at a constant 2e-3 the weights jitter, and one decaying round lifted validation exact match from 0.33
    to 0.52; without it every arm continuing from pi_0 at a lower rate gains that for free). The cooled-down model,
    copied to OUT/best, is the result."""
    import shutil

    from ..selfplay import train

    f, root = s["sft"], Path(out)
    record = root / "rounds.json"
    if record.exists() and (root / "best").exists():  # stopped before, its round models already removed
        return read_json(record, "the SFT rounds' record")
    for rounds in range(1, f["max_rounds"] + 1):
        ems = _sft_rounds(out, data, s, seed, model, fraction, rounds, progress, backend=backend)
        best = ems.index(max(ems))
        if len(ems) - 1 - best >= f["patience"]:
            break
    steps, final, val = round_steps(s, fraction), root / f"iter{best}", ems[best]
    cool = f["cooldown_rounds"]
    if cool:  # its own data order (seed + 1), the same subset (data_seed)
        cfg = _cfg(s, Path(data), seed + 1, progress, backend, method="sft", model_name_or_path=str(final / "model"),
                   data_fraction=fraction, data_seed=seed, learning_rate=f["lr"], lr_scheduler="linear",
                   warmup_ratio=0.0, num_train_epochs=cool * round_epochs(s, fraction),
                   output_dir=str(root / "cooldown"))
        val, final = train(cfg, resume=True)["eval/exact_match"], root / "cooldown"
    result = {"model": _keep_model(final, root / "best"), "best_round": best + 1,
              "stopped_by": "patience" if len(ems) - 1 - best >= f["patience"] else "max_rounds",
              "val_exact_match": ems, "steps_per_round": steps, "cooldown_steps": cool * steps, "val_final": val,
              "steps_to_best": steps * (best + 1 + cool)}
    # later stages read OUT/best only: the rounds' models (most of the run's disk) go, their evaluations stay;
    # the record first, so that a run killed in between does not train the rounds again
    atomic_write_json(record, result)
    for t in range(len(ems)):
        shutil.rmtree(root / f"iter{t}" / "model", ignore_errors=True)
    shutil.rmtree(root / "cooldown" / "model", ignore_errors=True)
    return result


def _keep_model(round_dir: Path, dest: Path) -> str:
    """Copy a round's model to `dest`, a path that does not depend on which round it was."""
    import shutil

    if not dest.exists():
        with atomic_path(dest) as tmp:
            shutil.copytree(round_dir / "model", tmp)
    return str(dest)


def proto(*, out: str, data: str, s: dict, seed: int, pi0: str, progress: bool = False, backend: str = "hf") -> dict:
    """y0 for every prompt of the seed's 25% subset, sampled once by pi_0 (``tspin generate --field=proto``)."""
    from ..selfplay import generate

    cfg = _cfg(s, Path(data), seed, progress, backend, method="tspin", model_name_or_path=pi0,
               data_fraction=s["fraction"], output_dir=out)
    path = generate(cfg, str(Path(out) / "proto.jsonl"), field="proto")
    return {"proto": str(path), "same_as_real": _match_rate(read_jsonl(path), "proto")}


def _match_rate(rows: list[dict], field: str) -> float:
    """y' = y: the share of rows whose `field` is the reference's whole text (no answer pattern: a sample with the
    reference's steps and another separator is another sequence, and its self-play gradient is not zero)."""
    from ..evaluation import answer_key

    return sum(answer_key(r[field]) == answer_key(r["real"]) for r in rows) / max(len(rows), 1)


def selfplay_config(*, out: str, data: str, s: dict, seed: int, pi0: str, proto_path: str | None, method: str,
                    params: dict, progress: bool = False, backend: str = "hf") -> Config:
    """The `tspin iterate` config of a run from `pi0`: self-play on the 25% subset (methods tspin, tspin_nohist,
    spin; pt_tspin: T-SPIN from the from-pretrained pi_0'), each iteration sampling the whole subset and training
    `selfplay_epochs` of an epoch over it, or sft_cont: SFT on 100% in one round of as many optimizer steps as a
    self-play run takes in all its iterations (SPIN's mixing of the previous iteration's samples doubles its
    steps: off unless the settings turn it on)."""
    kw = dict(method=method.removeprefix("pt_"), no_history=False, data_fraction=s["fraction"],
              num_iterations=s["iterations"], num_train_epochs=s["selfplay_epochs"])
    if method == "tspin_nohist":
        kw.update(method="tspin", no_history=True)
    elif method == "sft_cont":
        steps = s["iterations"] * selfplay_steps(s)
        epochs = steps / steps_per_epoch(s, None)
        assert math.ceil(epochs * steps_per_epoch(s, None)) == steps, \
            "n_train must make the steps match exactly"  # the trainer takes ceil(epochs * n/b)
        kw.update(method="sft", data_fraction=None, num_iterations=1, num_train_epochs=epochs)
    if method == "spin":
        kw.update(spin_mix_previous=s["spin_mix_previous"])
    return _cfg(s, Path(data), seed, progress, backend, model_name_or_path=pi0, beta=s["beta"],
                proto_path=proto_path if kw["method"] != "sft" else None, output_dir=out, **kw, **params)


def steps_taken(run_dir: Path) -> list[int]:
    """The optimizer steps each iteration of a run took, read from its metrics.jsonl."""
    steps: dict[int, int] = {}
    for r in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if r.get("phase") == "train":
            steps[r["iteration"]] = max(steps.get(r["iteration"], 0), r["step"])
    return [steps[t] for t in sorted(steps)]


def selfplay(**kw) -> dict:
    """A run from pi_0 (:func:`selfplay_config`, ``tspin iterate``), validation after each iteration: validation
    exact match, y' = y on the training prompts per iteration (``same_as_real``, over every prompt sampled), the
    optimizer steps and examples trained per iteration, the prompts each iteration drew them from (``pool``: the
    whole subset is sampled), and the last epoch's training diagnostics."""
    from ..iteration_data import expand_spin_mix
    from ..selfplay import iterate

    cfg = selfplay_config(**kw)
    out, iterations = Path(cfg.output_dir), cfg.num_iterations
    summary = iterate(cfg, resume=True)
    data = [read_jsonl(out / f"iter{t}" / "data.jsonl") for t in range(iterations)]
    same = [_match_rate(rows, "generated") for rows in data] if cfg.method != "sft" else None
    pool = [len(expand_spin_mix(rows) if cfg.method == "spin" else rows) for rows in data]
    steps, per_step = steps_taken(out), cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    train = [{k: v for k, v in e.items() if k.startswith("train/")} for e in summary["evals"] if e["iteration"] >= 0]
    return {"val_exact_match": [e["eval/exact_match"] for e in summary["evals"]], "same_as_real": same,
            "steps": steps, "examples": [min(n, k * per_step) for n, k in zip(pool, steps)], "pool": pool,
            "train": train,
            "models": [str(out / f"iter{t}" / "model") for t in range(iterations)]}


def test_eval(*, out: str, data: str, s: dict, models: dict[str, str], backend: str = "hf") -> dict:
    """Greedy evaluation of `models` ({label: model dir}) on the seed's test prompts: metrics per label, and
    per-prompt outcomes in OUT/<label>.jsonl for the paired tests."""
    from ..evaluation import evaluate
    from ..models import load_policy, load_tokenizer
    from ..settings import evaluation, load_settings

    test = load_records(Path(data) / "test.jsonl")
    result = {}
    for label, model in models.items():
        cfg = demo_config(model_name_or_path=model, progress=False, generation_backend=backend)
        path = Path(out) / f"{label.replace('/', '__')}.jsonl"
        result[label] = evaluate(load_policy(load_settings(cfg)), load_tokenizer(model), test, **evaluation(cfg),
                                 out_path=path, weights=model)
    return result


def test_group(label: str) -> str:
    """The test job that scores `label` (``tspin/iter2`` -> ``tspin``; ``pi_0``, ``sft_cont``: themselves)."""
    return label.partition("/")[0]


def read_test_rows(test_dir: Path, label: str) -> list[dict]:
    """Per-prompt test rows of `label` (prompt_id, real, greedy, exact), in test-file order."""
    return read_jsonl(Path(test_dir) / test_group(label) / f"{label.replace('/', '__')}.jsonl")


# ----------------------------------------------------------------------------- the jobs
FN = "tspin.experiments.runs:"


def shared_jobs(out: Path, s: dict, *, progress: bool = False, backend: str = "hf") -> list[Job]:
    """The corpus and the pretrained base every seed starts from."""
    return [Job("corpus", FN + "make_corpus_files", out / "corpus", dict(out=str(out / "corpus"), s=s)),
            Job("pretrain", FN + "pretrain", out / "pretrain",
                dict(out=str(out / "pretrain"), corpus=str(out / "corpus"), s=s, progress=progress, backend=backend),
                ("corpus",))]


def seed_jobs(out: Path, s: dict, seed: int, runs: dict[str, list[dict]], *, progress: bool = False,
              test_runs: dict[str, dict] | None = None, from_pretrained: dict | None = None,
              backend: str = "hf") -> list[Job]:
    """The jobs of one seed after the shared ones: its prompts, pi_0 (SFT on 100% from the pretrained model), the
    proto, the runs from pi_0 (`runs`: {method: [params, ...]}, method one of METHODS, or ``<method>@<tag>`` for a
    stability run) and, when `test_runs` ({label: params}, labels as in `runs`) is given, test evaluations of pi_0
    and of those runs. `from_pretrained` (T-SPIN's params) adds the labelled extra arm: pi_0' = SFT on the 25% from
    the pretrained model, T-SPIN from it, both scored on the test prompts. Without `test_runs` nothing touches the
    test prompts (the study's grid phase). `backend` samples and answers greedily in every job (hf or vllm)."""
    d, tag = out / f"seed{seed}", f"seed{seed}"
    data = str(d / "data")
    base = dict(data=data, s=s, seed=seed, progress=progress, backend=backend)
    pretrained, pi0 = str(out / "pretrain" / "run" / "model"), str(d / "pi0" / "best")
    shared = {"corpus", "pretrain"}

    def job(name, fn, deps, **kw):
        return Job(f"{tag}/{name}", FN + fn, d / name, dict(out=str(d / name), **kw),
                   tuple(x if x in shared else f"{tag}/{x}" for x in deps))

    def run_dir(label: str, params: dict) -> str:
        method, _, _ = label.partition("@")
        return f"runs/{run_name(method, params)}"

    jobs = [Job(f"{tag}/data", FN + "make_seed_data", d / "data", dict(out=data, s=s, seed=seed)),
            job("pi0", "sft_early_stopped", ["pretrain", "data"], model=pretrained, fraction=None, **base),
            job("proto", "proto", ["pi0"], pi0=pi0, **base)]
    for label, grid in runs.items():
        method = label.partition("@")[0]
        for params in grid:
            jobs.append(job(run_dir(label, params), "selfplay", ["pi0" if method == "sft_cont" else "proto"],
                            pi0=pi0, method=method, params=params, proto_path=str(d / "proto" / "proto.jsonl"),
                            **base))
    if from_pretrained is not None:
        # after pi_0, though it does not need it: pi_0 is the demo's longest job and everything else waits for it, so
        # it runs alone and gets both cores (tspin.experiments.jobs); the extra arm fills the cores after it
        jobs += [job("pt_sft25", "sft_early_stopped", ["pretrain", "data", "pi0"], model=pretrained,
                     fraction=s["fraction"], **base),
                 job("pt_proto", "proto", ["pt_sft25"], pi0=str(d / "pt_sft25" / "best"), **base),
                 job(run_dir("pt_tspin", from_pretrained), "selfplay", ["pt_proto"], pi0=str(d / "pt_sft25" / "best"),
                     method="pt_tspin", params=from_pretrained, proto_path=str(d / "pt_proto" / "proto.jsonl"),
                     **base)]
    if test_runs is None:
        return jobs

    def test(group: str, dep: str, models: dict[str, str]) -> Job:
        return job(f"test/{group}", "test_eval", [dep], data=data, s=s, backend=backend, models=models)

    jobs.append(test("pi_0", "pi0", {"pi_0": pi0}))
    runs_tested = dict(test_runs, **({"pt_tspin": from_pretrained} if from_pretrained is not None else {}))
    for label, params in runs_tested.items():
        run = d / run_dir(label, params)
        if label == "sft_cont":
            jobs.append(test(label, run_dir(label, params), {label: str(run / "iter0" / "model")}))
        else:
            jobs.append(test(label, run_dir(label, params),
                             {f"{label}/iter{t}": str(run / f"iter{t}" / "model") for t in range(s["iterations"])}))
    if from_pretrained is not None:
        jobs.append(test("pt_sft25", "pt_sft25", {"pt_sft25": str(d / "pt_sft25" / "best")}))
    return jobs
