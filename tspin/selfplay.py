"""The commands: `iterate` (the self-play loop: proto once, then per iteration generate -> train -> evaluate),
`train` (one training run on a data file) and `generate` (sample responses for a data file).

Output layout (every file written atomically, every stage skipped when its output already exists, so a killed
run resumes where it stopped):

    OUT/config.yaml  metrics.jsonl  summary.json  proto.jsonl
    OUT/iter{t}/generated.jsonl   y' sampled by the start-of-iteration policy (not at t=0 when it is the proto)
    OUT/iter{t}/data.jsonl        the iteration's training records (+ SPIN reference log-probs, computed once)
    OUT/iter{t}/checkpoints/      mid-iteration checkpoints (every `save_steps`)
    OUT/iter{t}/model/            the iteration's final policy (save_pretrained + trainer state)
    OUT/iter{t}/eval.json         held-out evaluation of that policy
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .batch import fields_for
from .checkpoint import load_checkpoint
from .config import Config
from .data import build_features, load_records, select_subset, split_heldout
from .evaluation import evaluate
from .generation import generate_field
from .io import atomic_write_json, atomic_write_jsonl, read_jsonl
from .iteration_data import expand_spin_mix, iteration_data, spin_refs
from .metrics import MetricsWriter
from .models import load_policy, load_tokenizer
from .ranks import on_main
from .run_dir import open_run, record_config
from .train import train_loop


def prepare_records(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(training subset, held-out records). The held-out split is taken before subsetting, so the 25% and 100%
    runs are evaluated on the same prompts."""
    if not cfg.data_path:
        raise ValueError("config: data_path is required")
    records = load_records(cfg.data_path, cfg.data_split)
    if cfg.eval_data_path:
        train, held = records, load_records(cfg.eval_data_path, cfg.data_split)
    else:
        train, held = split_heldout(records, cfg.eval_size, cfg.data_seed)
    return select_subset(train, cfg.data_fraction, cfg.data_count, cfg.data_seed), held


def _start(cfg: Config, resume: bool):
    """Common start of `train` and `iterate`: refuse to overwrite a run, record the config, load everything."""
    out = open_run(cfg, resume)
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    records, held = prepare_records(cfg)  # data errors surface before anything is written
    torch.manual_seed(cfg.seed)
    model = load_policy(cfg)  # joins the process group under torchrun
    record_config(cfg, out)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    return out, tokenizer, records, held, model, MetricsWriter(out / "metrics.jsonl")


def _features(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    rows = expand_spin_mix(rows) if cfg.method == "spin" else rows
    return build_features(rows, tokenizer, fields_for(cfg.method), template=cfg.prompt_template,
                          max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                          ref=cfg.method == "spin")


def iterate(cfg: Config, resume: bool = False) -> dict:
    """The whole self-play loop (or `num_iterations` rounds of SFT with evaluation after each)."""
    out, tokenizer, records, held, model, metrics = _start(cfg, resume)

    evals = []
    init_eval = out / "eval_init.json"
    if held and not init_eval.exists():
        e = {"iteration": -1, **evaluate(model, tokenizer, held, cfg)}
        metrics.write(phase="eval", method=cfg.method, **e)
        on_main(atomic_write_json, init_eval, e)
    if init_eval.exists():
        evals.append(json.loads(init_eval.read_text()))

    proto_rows = None
    needs_proto = cfg.method == "tspin" and not cfg.no_history or (cfg.method != "sft" and cfg.reuse_proto_at_iter0)
    if needs_proto:
        proto_path = Path(cfg.proto_path) if cfg.proto_path else out / "proto.jsonl"
        proto_rows = generate_field(model, tokenizer, records, proto_path, "proto", cfg, seed=cfg.seed,
                                    desc="proto (pi_0)")
        if [p["prompt_id"] for p in proto_rows] != [r["prompt_id"] for r in records]:
            raise ValueError(f"proto_path {proto_path}: its prompts do not match the training subset")

    for t in range(cfg.num_iterations):
        it_dir = out / f"iter{t}"
        if not (it_dir / "model").exists():
            rows = iteration_data(model, tokenizer, records, proto_rows, cfg, t, it_dir, out)
            train_loop(model, tokenizer, _features(rows, tokenizer, cfg), cfg, method=cfg.method, out_dir=it_dir,
                       metrics=metrics, iteration=t, desc=f"iter{t} {cfg.method}")
        else:
            load_checkpoint(it_dir / "model", model)
        if held:
            if not (it_dir / "eval.json").exists():
                e = {"iteration": t, **evaluate(model, tokenizer, held, cfg, it_dir / "eval_generations.jsonl")}
                # a run killed between this line and eval.json would otherwise log the evaluation twice
                metrics.rewind(lambda r, t=t: not (r.get("phase") == "eval" and r.get("iteration") == t))
                metrics.write(phase="eval", method=cfg.method, **e)
                on_main(atomic_write_json, it_dir / "eval.json", e)
            evals.append(json.loads((it_dir / "eval.json").read_text()))
        else:
            evals.append({"iteration": t})
        if (it_dir / "train_summary.json").exists():  # the iteration's last-epoch training diagnostics
            evals[-1].update(json.loads((it_dir / "train_summary.json").read_text()))
    summary = {"method": cfg.method, "output_dir": str(out), "num_train_records": len(records),
               "num_eval_records": len(held), "evals": evals}
    on_main(atomic_write_json, out / "summary.json", summary)
    return summary


def train(cfg: Config, resume: bool = False) -> dict:
    """One training run on a data file (SFT on pairs; T-SPIN on files with generated+proto; SPIN with generated,
    its reference log-probs computed first by the loaded policy when the file lacks them). Writes OUT/model."""
    out, tokenizer, records, held, model, metrics = _start(cfg, resume)
    if (out / "model").exists():
        load_checkpoint(out / "model", model)
    else:
        if cfg.method == "spin" and any("ref_real" not in r for r in records):
            path = out / "data_with_refs.jsonl"
            if not path.exists():
                on_main(atomic_write_jsonl, path, spin_refs(model, tokenizer, records, cfg))
            records = read_jsonl(path)
        train_loop(model, tokenizer, _features(records, tokenizer, cfg), cfg, method=cfg.method, out_dir=out,
                   metrics=metrics, iteration=0, beta=cfg.beta if not cfg.no_history else 0.0,
                   desc=f"train {cfg.method}")
    result = {"method": cfg.method, "model": str(out / "model")}
    if held:
        result.update(evaluate(model, tokenizer, held, cfg, out / "eval_generations.jsonl"))
        metrics.write(phase="eval", method=cfg.method, iteration=0, **{k: v for k, v in result.items()
                                                                       if k.startswith("eval/")})
    on_main(atomic_write_json, out / "summary.json", result)
    return result


def generate(cfg: Config, out_path: str, field: str = "generated") -> Path:
    """Sample `field` for every (subset) record with the configured model; resumable, atomic. Under torchrun the
    prompts are shared out over the ranks (cfg.strategy as for training)."""
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    records = select_subset(load_records(cfg.data_path, cfg.data_split, require_response=False), cfg.data_fraction,
                            cfg.data_count, cfg.data_seed)
    model = load_policy(cfg)
    generate_field(model, tokenizer, records, out_path, field, cfg, seed=cfg.seed)
    return Path(out_path)
