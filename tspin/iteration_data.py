"""One self-play iteration's training rows: the synthetic responses y' (sampled by the start-of-iteration policy,
or the proto ones at iteration 0), the proto responses y0, and for SPIN the reference log-probs.

Written once to OUT/iter{t}/data.jsonl and read back on resume, so a killed run trains on the very same rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .data import Tokenization
from .generation import SamplingSettings, generate_field
from .io import atomic_write_jsonl, read_jsonl
from .losses import LogpSettings, scored_logps
from .phases import NULL_CLOCK, PhaseClock
from .ranks import on_main


@dataclass(frozen=True)
class IterationSettings:
    """What an iteration's rows depend on: the method (a config ``method``), the initial policy pi_0 (what samples
    y' at iteration 0), the run's seed, whether iteration 0 reuses the proto responses as y', SPIN's mixing of the
    previous iteration's y', how y' is sampled, and how SPIN's reference log-probs are computed."""

    method: str
    initial_policy: str
    seed: int
    reuse_proto_at_iter0: bool
    spin_mix_previous: bool
    sampling: SamplingSettings
    tokenization: Tokenization
    scoring: LogpSettings


def prompt_key(record: dict) -> tuple[str, str]:
    """What pairs a sampled response with a training record: its prompt_id and a hash of its prompt's text (an id
    alone would pair a file of other prompts that reuses the ids)."""
    return record["prompt_id"], hashlib.sha256(record["prompt"].encode("utf-8")).hexdigest()


def match_prompts(rows: list[dict], records: list[dict], source: str) -> list[dict]:
    """``rows`` (e.g. a proto file's) in the order of ``records``, each paired by :func:`prompt_key`; a record
    without its row raises a ValueError naming ``source``, the prompt_id and what differs."""
    by_key = {prompt_key(r): r for r in rows}
    missing = [r for r in records if prompt_key(r) not in by_key]
    if missing:
        first = missing[0]
        ids = {r["prompt_id"]: r for r in rows}
        why = ("holds another prompt under that prompt_id" if first["prompt_id"] in ids
               else "has no row with that prompt_id")
        raise ValueError(f"{source}: {why} (prompt_id {first['prompt_id']!r}; {len(missing)} of the {len(records)} "
                         "training prompts unmatched): a proto file must hold the same prompts (by id and text) as "
                         "the training subset; leave proto_path unset to sample one")
    return [by_key[prompt_key(r)] for r in records]


def spin_refs(model, tokenizer, rows: list[dict], *, tokenization: Tokenization, scoring: LogpSettings) -> list[dict]:
    """SPIN reference log-probs by the start-of-iteration policy, computed once under no_grad and stored with the
    data: no second model lives in memory while training."""
    fields = ("real", "generated") + (("generated_prev",) if rows and "generated_prev" in rows[0] else ())
    feats = tokenization.features(rows, tokenizer, fields)
    lp = scored_logps(model, feats, fields, tokenizer.pad_token_id, scoring, desc="reference log-probs")
    return [{**r, **{f"ref_{f}": lp[f][i] for f in fields}} for i, r in enumerate(rows)]


def expand_spin_mix(rows: list[dict]) -> list[dict]:
    """SPIN's two-iteration mixing: one pair with y'_{t-1} and one with y'_t per prompt."""
    out = []
    for r in rows:
        out.append(r)
        if r.get("generated_prev") is not None:
            out.append({**r, "prompt_id": r["prompt_id"] + "/prev", **_as(r, "generated_prev", "generated"),
                        "ref_generated": r.get("ref_generated_prev")})
    return out


def _as(row: dict, src: str, dst: str) -> dict:
    """A sampled response under another field name, with its token ids and truncation flag when it has them."""
    return {dst + suffix: row[src + suffix] for suffix in ("", "_ids", "_truncated") if src + suffix in row}


def iteration_data(model, tokenizer, records, proto_rows, settings: IterationSettings, t: int, it_dir: Path,
                   out: Path, clock: PhaseClock = NULL_CLOCK) -> list[dict]:
    """Iteration ``t``'s training rows (``records`` + y' [+ y0] [+ SPIN's references]), written to
    ``it_dir/data.jsonl`` once and read back from there on resume. ``clock`` times the sampling ("sample") and
    the reference log-probs ("reference") as phases of their own."""
    path = it_dir / "data.jsonl"
    if path.exists():
        return read_jsonl(path)
    s = settings
    if s.method == "sft":
        rows = [dict(r) for r in records]
    else:
        if t == 0 and s.reuse_proto_at_iter0 and proto_rows is not None:
            gen = [_as(p, "proto", "generated") for p in proto_rows]
        else:
            start = s.initial_policy if t == 0 else out / f"iter{t - 1}" / "model"  # the policy sampling y'
            with clock.phase("sample", iteration=t):
                gen = [_as(r, "generated", "generated") for r in generate_field(
                    model, tokenizer, records, it_dir / "generated.jsonl", "generated", s.sampling,
                    seed=s.seed + 1 + t, desc=f"iter{t} generate", weights=start)]
        rows = [{**r, **g} for r, g in zip(records, gen)]
        if proto_rows is not None:
            for r, p in zip(rows, proto_rows):
                r.update(_as(p, "proto", "proto"))
        if s.method == "spin" and s.spin_mix_previous and t > 0:
            prev = read_jsonl(out / f"iter{t - 1}" / "data.jsonl")
            for r, p in zip(rows, prev):
                r.update(_as(p, "generated", "generated_prev"))
        if s.method == "spin":
            with clock.phase("reference", iteration=t):
                rows = spin_refs(model, tokenizer, rows, tokenization=s.tokenization, scoring=s.scoring)
    on_main(atomic_write_jsonl, path, rows)
    return rows
