"""The commands: `iterate` (the self-play loop: proto once, then per iteration generate -> train -> evaluate),
`train` (one training run on a data file) and `generate` (sample responses for a data file).

Output layout (every file written atomically, every stage skipped when its output already exists, so a killed
run resumes where it stopped):

    OUT/tspin-run.json            the run manifest, written first: the directory is tspin's (tspin.run_dir)
    OUT/config.yaml  inputs.json  metrics.jsonl  summary.json  proto.jsonl
    OUT/phases.jsonl              seconds and peak GPU memory per phase (sampling, training, ...; tspin.phases)
    OUT/iter{t}/generated.jsonl   y' sampled by the start-of-iteration policy (not at t=0 when it is the proto)
    OUT/iter{t}/data.jsonl        the iteration's training records (+ SPIN reference log-probs, computed once)
    OUT/iter{t}/checkpoints/      mid-iteration checkpoints (every `save_steps`)
    OUT/iter{t}/model/            the iteration's final policy (save_pretrained + trainer_state/: step, RNG)
    OUT/iter{t}/eval.json         held-out evaluation of that policy
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tspin_kernels.integrations import attention_implementation

from .batch import fields_for
from .checkpoint import load_checkpoint
from .config import Config
from .data import DataError, drop_truncated, format_prompt, load_records, select_subset, split_heldout
from .evaluation import evaluate
from .generation import check_backend, generate_field, partial_path
from .io import atomic_write_json, atomic_write_jsonl, clean_stale_temps, read_json, read_jsonl
from .iteration_data import expand_spin_mix, iteration_data, match_prompts, spin_refs
from .metrics import MetricsWriter
from .models import check_source, load_policy, load_tokenizer
from .phases import NULL_CLOCK, PhaseClock
from .ranks import init_distributed, on_main
from .rng import seed_all
from .run_dir import (
    check_output_dir,
    check_same_inputs,
    input_fingerprints,
    open_run,
    record_run,
    records_digest,
    source_fingerprint,
)
from .settings import (
    evaluation,
    iteration_settings,
    load_settings,
    reference_scoring,
    sampling,
    tokenization,
    train_settings,
)
from .train import train_loop
from .wrapping import policy_of

# Columns an input record has (tspin.data.normalize_record): `generate --field` never writes over them.
INPUT_COLUMNS = ("prompt_id", "prompt", "real", "response", "messages")
# the config keys a `tspin generate` output depends on (beside the model, tokenizer and data)
GENERATION_KEYS = ("prompt_template", "max_prompt_length", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                   "generation_backend")


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


def _start(cfg: Config, resume: bool, overwrite: bool):
    """Common start of `train` and `iterate`: refuse a directory that is not free for this run, load and check
    everything, then record the run (a start that fails before that writes nothing; one that fails after it, before
    any result, is started afresh by the corrected command: tspin.run_dir.holds_results)."""
    out, started = open_run(cfg.to_dict(), resume, overwrite)
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _check_sources(cfg)
    if cfg.proto_path and not Path(cfg.proto_path).is_file():
        raise FileNotFoundError(f"config: proto_path={cfg.proto_path!r}: file not found (it names a proto file to "
                                "reuse; leave it unset to generate one)")
    records, held = prepare_records(cfg)  # data errors surface before anything is written
    inputs = input_fingerprints(model=cfg.model_name_or_path, tokenizer=_tokenizer_path(cfg),
                                proto_path=cfg.proto_path, records=records, held=held)
    if started:
        check_same_inputs(out, inputs)
    seed_all(cfg.seed)  # LoRA's initial adapters
    model = load_policy(load_settings(cfg))  # joins the process group under torchrun
    tokenizer = _tokenizer(cfg)
    format_prompt(tokenizer, records[0]["prompt"], cfg.prompt_template)  # e.g. 'chat' without a chat template
    record_run(cfg.to_dict(), out, inputs, overwrite)
    # the attention the policy runs (config attn_implementation, "auto" resolved), on every metrics line
    static = {"attn_implementation": attention_implementation(policy_of(model).model)}
    return out, tokenizer, records, held, model, MetricsWriter(out / "metrics.jsonl", static=static)


def _check_sources(cfg: Config) -> None:
    check_source("model_name_or_path", cfg.model_name_or_path, weights=True)
    if cfg.tokenizer_name_or_path:
        check_source("tokenizer_name_or_path", cfg.tokenizer_name_or_path)
    # generation_backend 'vllm': installed, and the initial policy a saved model it serves
    check_backend(cfg.generation_backend, cfg.model_name_or_path, sampling(cfg).engine)


def _tokenizer_path(cfg: Config) -> str:
    return cfg.tokenizer_name_or_path or cfg.model_name_or_path


def _tokenizer(cfg: Config):
    return load_tokenizer(_tokenizer_path(cfg))


def _evaluate_once(model, tokenizer, held: list[dict], cfg: Config, metrics: MetricsWriter, path: Path,
                   iteration: int, weights: str | Path, generations: Path | None = None,
                   clock: PhaseClock = NULL_CLOCK) -> dict:
    """The evaluation stored at `path`: computed and logged once, read back on resume. A run killed between its
    metric line and `path` drops that line before logging the evaluation again. `weights`: the saved policy
    `model` holds (generation_backend 'vllm' samples from it)."""
    if path.exists():
        return read_json(path, "evaluation")
    with clock.phase("eval", iteration=iteration):
        e = {"iteration": iteration, **evaluate(model, tokenizer, held, **evaluation(cfg), out_path=generations,
                                                weights=weights)}
    metrics.rewind(lambda r: not (r.get("phase") == "eval" and r.get("iteration") == iteration))
    metrics.write(phase="eval", method=cfg.method, **e)
    on_main(atomic_write_json, path, e)
    return e


def _features(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    rows = expand_spin_mix(rows) if cfg.method == "spin" else rows
    fields = fields_for(cfg.method, cfg.no_history)
    if cfg.truncated_samples == "drop":
        kept = drop_truncated(rows, fields)
        if not kept:
            raise DataError(f"truncated_samples=drop: every sample was cut at max_new_tokens={cfg.max_new_tokens}; "
                            "raise max_new_tokens or keep them (keep_without_eos)")
        rows = kept
    return tokenization(cfg).features(rows, tokenizer, fields, ref=cfg.method == "spin")


def iterate(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """The whole self-play loop (or `num_iterations` rounds of SFT with evaluation after each). ``resume``: continue
    the run in cfg.output_dir; ``overwrite``: start afresh there (tspin.run_dir: what is deleted, what is kept)."""
    out, tokenizer, records, held, model, metrics = _start(cfg, resume, overwrite)
    clock = PhaseClock(out / "phases.jsonl", next(model.parameters()).device)  # time, memory (tspin.phases)

    evals = []
    if held:
        evals.append(_evaluate_once(model, tokenizer, held, cfg, metrics, out / "eval_init.json", -1,
                                    cfg.model_name_or_path, clock=clock))

    proto_rows = None
    needs_proto = cfg.method == "tspin" and not cfg.no_history or (cfg.method != "sft" and cfg.reuse_proto_at_iter0)
    if needs_proto:
        proto_path = Path(cfg.proto_path) if cfg.proto_path else out / "proto.jsonl"
        with clock.phase("proto", iteration=-1):
            proto_rows = generate_field(model, tokenizer, records, proto_path, "proto", sampling(cfg), seed=cfg.seed,
                                        desc="proto (pi_0)", weights=cfg.model_name_or_path)
        proto_rows = match_prompts(proto_rows, records, f"proto_path {proto_path}")

    for t in range(cfg.num_iterations):
        it_dir = out / f"iter{t}"
        seed_all(cfg.seed, t)  # each iteration starts from its own RNG state, whatever ran before in this process
        if not (it_dir / "model").exists():
            rows = iteration_data(model, tokenizer, records, proto_rows, iteration_settings(cfg), t, it_dir, out,
                                  clock=clock)
            with clock.phase("train", iteration=t):  # tokenizing, the steps; its checkpoints are phases of their own
                train_loop(model, tokenizer, _features(rows, tokenizer, cfg), train_settings(cfg), method=cfg.method,
                           out_dir=it_dir, metrics=metrics, iteration=t, desc=f"iter{t} {cfg.method}", clock=clock)
        else:
            load_checkpoint(it_dir / "model", model)
        if held:
            evals.append(_evaluate_once(model, tokenizer, held, cfg, metrics, it_dir / "eval.json", t,
                                        it_dir / "model", it_dir / "eval_generations.jsonl", clock=clock))
        else:
            evals.append({"iteration": t})
        if (it_dir / "train_summary.json").exists():  # the iteration's last-epoch training diagnostics
            evals[-1].update(read_json(it_dir / "train_summary.json", "training summary"))
    summary = {"method": cfg.method, "output_dir": str(out), "num_train_records": len(records),
               "num_eval_records": len(held), "evals": evals}
    on_main(atomic_write_json, out / "summary.json", summary)
    return summary


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """One training run on a data file (SFT on pairs; T-SPIN on files with generated+proto; SPIN with generated,
    its reference log-probs computed first by the loaded policy when the file lacks them). Writes OUT/model.
    ``resume`` / ``overwrite`` as for :func:`iterate`."""
    out, tokenizer, records, held, model, metrics = _start(cfg, resume, overwrite)
    clock = PhaseClock(out / "phases.jsonl", next(model.parameters()).device)
    seed_all(cfg.seed, 0)
    if (out / "model").exists():
        load_checkpoint(out / "model", model)
    else:
        if cfg.method == "spin" and any("ref_real" not in r for r in records):
            path = out / "data_with_refs.jsonl"
            if not path.exists():
                with clock.phase("reference", iteration=0):
                    refs = spin_refs(model, tokenizer, records, tokenization=tokenization(cfg),
                                     scoring=reference_scoring(cfg))
                on_main(atomic_write_jsonl, path, refs)
            records = read_jsonl(path)
        with clock.phase("train", iteration=0):
            train_loop(model, tokenizer, _features(records, tokenizer, cfg), train_settings(cfg), method=cfg.method,
                       out_dir=out, metrics=metrics, iteration=0, beta=cfg.beta if not cfg.no_history else 0.0,
                       desc=f"train {cfg.method}", clock=clock)
    result = {"method": cfg.method, "model": str(out / "model")}
    if held:  # once: a resumed finished run reads it back instead of logging it again
        e = _evaluate_once(model, tokenizer, held, cfg, metrics, out / "eval.json", 0, out / "model",
                           out / "eval_generations.jsonl", clock=clock)
        result.update({k: v for k, v in e.items() if k.startswith("eval/")})
    on_main(atomic_write_json, out / "summary.json", result)
    return result


def generate(cfg: Config, out_path: str, field: str = "generated") -> Path:
    """Sample `field` for every (subset) record with the configured model; resumable, atomic. Under torchrun the
    prompts are shared out over the ranks (cfg.strategy as for training)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", field) or field in INPUT_COLUMNS or field.startswith("ref_"):
        raise ValueError(f"--field={field!r}: expected a new column name (letters, digits, _), not one of "
                         f"{', '.join(INPUT_COLUMNS)} or ref_*")
    if not str(out_path).strip():
        raise ValueError("--out: expected the path of the JSONL file to write, got an empty value")
    if Path(out_path).is_dir():
        raise IsADirectoryError(f"--out {out_path}: is a directory; expected the path of the JSONL file to write")
    if not cfg.data_path:
        raise ValueError("config: data_path is required")
    _check_sources(cfg)
    records = select_subset(load_records(cfg.data_path, cfg.data_split, require_response=False), cfg.data_fraction,
                            cfg.data_count, cfg.data_seed)
    if any(field in r for r in records):
        raise ValueError(f"--field={field!r}: {cfg.data_path} already has a {field!r} column, and generate never "
                         "overwrites an input column; choose another --field")
    out = Path(out_path)
    check_output_dir(out.parent, f"--out {out}")
    if out.exists():  # a finished earlier run of this command is kept (resumable); anything else is refused
        try:  # the records as written (load_records keeps only the columns it knows, not a custom --field)
            done = read_jsonl(out) if out.is_file() else None
        except (ValueError, UnicodeDecodeError):
            done = None
        if done is None or [str(r.get("prompt_id")) for r in done] != [r["prompt_id"] for r in records] \
                or any(r.get(field) is None for r in done):
            raise FileExistsError(f"--out {out}: the file exists and is not this command's output (the {field!r} "
                                  "column for the same prompts); remove it or choose another --out")
    settings = _check_generation_settings(cfg, records, field, out)
    tokenizer = _tokenizer(cfg)
    if cfg.generation_backend == "hf":
        model = load_policy(load_settings(cfg))  # joins the process group under torchrun: then rank 0 alone cleans
    else:  # vLLM loads the weights itself: no trainer copy in memory
        init_distributed()
        model = None
    on_main(clean_stale_temps, out.parent, {out.name})
    on_main(atomic_write_json, _settings_path(out), settings)
    generate_field(model, tokenizer, records, out, field, sampling(cfg), seed=cfg.seed, weights=cfg.model_name_or_path)
    return out


def _settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _check_generation_settings(cfg: Config, records: list[dict], field: str, out: Path) -> dict:
    """What the samples in ``out`` (finished) or ``out.partial`` (a killed run's batches) depend on. A rerun keeps
    them only if it would sample the same way: another model, temperature, seed, ... is refused, naming the keys,
    instead of handing back (or continuing) samples of other settings. Written as ``<out>.settings.json``."""
    settings = {"field": field, "data": records_digest(records), "model": source_fingerprint(cfg.model_name_or_path),
                "tokenizer": source_fingerprint(_tokenizer_path(cfg)),
                **{k: getattr(cfg, k) for k in GENERATION_KEYS}}
    path = _settings_path(out)
    partial = partial_path(out)
    if path.exists() and (out.exists() or partial.exists()):
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            saved = {}
        diff = [k for k in settings if saved.get(k) != settings[k]]
        if diff:
            what = "the file" if out.exists() else f"the unfinished samples in {partial.name}"
            raise FileExistsError(f"--out {out}: {what} came from other settings (changed: {', '.join(diff)}; "
                                  f"see {path.name}); remove {out.name}, {partial.name} and {path.name}, or choose "
                                  "another --out")
    return settings
