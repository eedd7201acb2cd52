"""The self-play loop and the single-step commands: proto once, then per iteration generate -> train -> evaluate.

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

from .checkpoint import load_trainer_state
from .config import Config, save_config
from .data import build_features, fields_for, load_records, select_subset, split_heldout
from .generation import generate_field, generate_texts
from .io import atomic_write_json, atomic_write_jsonl, read_jsonl
from .losses import batched_logps
from .metrics import MetricsWriter
from .ranks import barrier, on_main
from .train import autocast, resolve_device, train_loop


# ----------------------------------------------------------------------------- setup
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path}: needs a pad or an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    if not path:
        raise ValueError("config: model_name_or_path is required")
    # fp32 master weights; bf16 comes from autocast on GPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device)


def load_policy(cfg: Config):
    """The policy every command trains and samples from: the HF model (+ LoRA adapters, + gradient checkpointing,
    both before wrapping) inside CausalLMLogps, wrapped for cfg.strategy (tspin.distributed). Its forward is the
    fused log-prob path, so DDP's all-reduce and FSDP2's unsharding cover the whole loss."""
    import dataclasses

    from .distributed import (
        apply_lora,
        enable_gradient_checkpointing,
        init_distributed,
        load_for_training,
        wrap_model,
    )

    if not cfg.model_name_or_path:
        raise ValueError("config: model_name_or_path is required")
    info = init_distributed()
    if cfg.strategy != "none" and not info.distributed:
        raise ValueError(f"config: strategy={cfg.strategy!r} needs a process group: launch with torchrun "
                         "--nproc_per_node N -m tspin.cli ... (or accelerate launch)")

    def prepare(model):
        if cfg.lora_rank:
            model = apply_lora(model, r=cfg.lora_rank, alpha=cfg.lora_alpha,
                               target_modules=cfg.lora_target_modules_list())
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    if cfg.strategy == "none":  # one copy per process, on cfg.device
        info = dataclasses.replace(info, device=resolve_device(cfg.device))
        return wrap_model(prepare(load_model(cfg.model_name_or_path, torch.device("cpu"))), "none", info=info)
    # fp32 master weights; FSDP2 computes in bf16 on GPU (its own mixed precision instead of autocast's casts)
    bf16 = torch.bfloat16 if cfg.strategy == "fsdp2" and info.device.type == "cuda" and cfg.bf16 else None
    return load_for_training(cfg.model_name_or_path, cfg.strategy, info=info, param_dtype=bf16, prepare=prepare)


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


def check_fresh(out: Path, resume: bool, marker: str) -> None:
    if (out / marker).exists() and not resume:
        raise FileExistsError(f"output_dir {out} already holds a run ({marker}); pass --resume to continue it or "
                              "choose another output_dir")


def _normalize(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, records: list[dict], cfg: Config, out_path: Path | None = None) -> dict:
    """Exact match of greedy answers on held-out prompts, and log-likelihood of the references vs the greedy answers."""
    if not records:
        return {}
    device = next(model.parameters()).device
    greedy = generate_texts(model, tokenizer, [r["prompt"] for r in records], template=cfg.prompt_template,
                            max_prompt_length=cfg.max_prompt_length,
                            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, temperature=0.0,
                            batch_size=cfg.eval_batch_size, progress=cfg.progress, desc="evaluate")
    rows = [{**r, "generated": g} for r, g in zip(records, greedy)]
    feats = build_features(rows, tokenizer, ("real", "generated"), template=cfg.prompt_template,
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    pad = tokenizer.pad_token_id
    with autocast(device, cfg.bf16):
        lp = batched_logps(model, feats, ("real", "generated"), pad, batch_size=cfg.eval_batch_size,
                           impl=cfg.loss_impl, layout=cfg.layout)
    n_tok = sum(sum(1 for x in f["real"][1] if x != -100) for f in feats)
    exact = [_normalize(g) == _normalize(r["real"]) for g, r in zip(greedy, records)]
    if out_path is not None:
        on_main(atomic_write_jsonl, out_path, [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["real"],
                                       "greedy": g, "exact": e} for r, g, e in zip(records, greedy, exact)])
    n = len(records)
    return {"eval/exact_match": sum(exact) / n, "eval/logps/real": sum(lp["real"]) / n,
            "eval/logps/greedy": sum(lp["generated"]) / n,
            "eval/margins/real_vs_greedy": sum(a - b for a, b in zip(lp["real"], lp["generated"])) / n,
            "eval/nll_per_token": -sum(lp["real"]) / max(n_tok, 1), "eval/num_prompts": n}


# ----------------------------------------------------------------------------- one iteration's data
def _spin_refs(model, tokenizer, rows: list[dict], cfg: Config) -> list[dict]:
    """SPIN reference log-probs by the start-of-iteration policy, computed once under no_grad and stored with the
    data: no second model lives in memory while training."""
    fields = ("real", "generated") + (("generated_prev",) if rows and "generated_prev" in rows[0] else ())
    feats = build_features(rows, tokenizer, fields, template=cfg.prompt_template, max_length=cfg.max_length,
                           max_prompt_length=cfg.max_prompt_length)
    device = next(model.parameters()).device
    with autocast(device, cfg.bf16):
        lp = batched_logps(model, feats, fields, tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                           impl=cfg.loss_impl, average=cfg.average_logps, layout=cfg.layout, progress=cfg.progress,
                           desc="reference log-probs")
    return [{**r, **{f"ref_{f}": lp[f][i] for f in fields}} for i, r in enumerate(rows)]


def expand_spin_mix(rows: list[dict]) -> list[dict]:
    """SPIN's two-iteration mixing: one pair with y'_{t-1} and one with y'_t per prompt."""
    out = []
    for r in rows:
        out.append(r)
        if r.get("generated_prev") is not None:
            out.append({**r, "prompt_id": r["prompt_id"] + "/prev", "generated": r["generated_prev"],
                        "ref_generated": r.get("ref_generated_prev")})
    return out


def iteration_data(model, tokenizer, records, proto_rows, cfg: Config, t: int, it_dir: Path, out: Path) -> list[dict]:
    path = it_dir / "data.jsonl"
    if path.exists():
        return read_jsonl(path)
    if cfg.method == "sft":
        rows = [dict(r) for r in records]
    else:
        if t == 0 and cfg.reuse_proto_at_iter0 and proto_rows is not None:
            gen = [p["proto"] for p in proto_rows]
        else:
            gen = [r["generated"] for r in generate_field(model, tokenizer, records, it_dir / "generated.jsonl",
                                                          "generated", cfg, seed=cfg.seed + 1 + t,
                                                          desc=f"iter{t} generate")]
        rows = [{**r, "generated": g} for r, g in zip(records, gen)]
        if proto_rows is not None:
            for r, p in zip(rows, proto_rows):
                r["proto"] = p["proto"]
        if cfg.method == "spin" and cfg.spin_mix_previous and t > 0:
            prev = read_jsonl(out / f"iter{t - 1}" / "data.jsonl")
            for r, p in zip(rows, prev):
                r["generated_prev"] = p["generated"]
        if cfg.method == "spin":
            rows = _spin_refs(model, tokenizer, rows, cfg)
    on_main(atomic_write_jsonl, path, rows)
    return rows


# ----------------------------------------------------------------------------- commands
RESUME_FREE_KEYS = {"progress", "device", "logging_steps", "save_steps", "save_total_limit", "num_iterations",
                    "eval_batch_size", "generation_batch_size"}


def _check_same_config(cfg: Config, path: Path) -> None:
    """A resumed run must be the run that was started: refuse silent changes of data, model or method."""
    import yaml

    saved = yaml.safe_load(path.read_text()) or {}
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS and k in saved and saved[k] != v]
    if diff:
        raise ValueError(f"--resume: config differs from {path} in " + ", ".join(
            f"{k} ({saved[k]!r} -> {getattr(cfg, k)!r})" for k in diff) + "; start a new output_dir instead")


def _start(cfg: Config, resume: bool):
    """Common start of `train` and `iterate`: refuse to overwrite a run, record the config, load everything."""
    out = Path(cfg.output_dir)
    check_fresh(out, resume, "config.yaml")
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if resume and (out / "config.yaml").exists():
        _check_same_config(cfg, out / "config.yaml")
    records, held = prepare_records(cfg)  # data errors surface before anything is written
    torch.manual_seed(cfg.seed)
    model = load_policy(cfg)  # joins the process group under torchrun
    barrier()  # every rank has checked the directory before rank 0 writes into it
    on_main(_record_config, cfg, out)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    return out, tokenizer, records, held, model, MetricsWriter(out / "metrics.jsonl")


def _record_config(cfg: Config, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")


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
            if cfg.method == "spin":
                rows = expand_spin_mix(rows)
            feats = build_features(rows, tokenizer, fields_for(cfg.method), template=cfg.prompt_template,
                                   max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                   ref=cfg.method == "spin")
            train_loop(model, tokenizer, feats, cfg, method=cfg.method, out_dir=it_dir, metrics=metrics, iteration=t,
                       desc=f"iter{t} {cfg.method}")
        else:
            load_trainer_state(it_dir / "model", model)
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
        load_trainer_state(out / "model", model)
    else:
        if cfg.method == "spin" and any("ref_real" not in r for r in records):
            path = out / "data_with_refs.jsonl"
            if not path.exists():
                on_main(atomic_write_jsonl, path, _spin_refs(model, tokenizer, records, cfg))
            records = read_jsonl(path)
        feats = build_features(expand_spin_mix(records) if cfg.method == "spin" else records, tokenizer,
                               fields_for(cfg.method), template=cfg.prompt_template, max_length=cfg.max_length,
                               max_prompt_length=cfg.max_prompt_length, ref=cfg.method == "spin")
        train_loop(model, tokenizer, feats, cfg, method=cfg.method, out_dir=out, metrics=metrics, iteration=0,
                   beta=cfg.beta if not cfg.no_history else 0.0, desc=f"train {cfg.method}")
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
