"""Sample records shared by both generation backends: one response (:class:`Sample`), the resumable `.partial`
file a generation appends its finished batches to, and the sharding of prompts over the ranks under torchrun.

Each finished batch is appended to `<out>.partial` (flushed and fsynced); a restarted run keeps those lines made with
the same chunking and goes on from the next batch. A line torn by a kill is dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..io import append_jsonl
from ..ranks import world


@dataclass(frozen=True)
class Sample:
    """One response: its text (special tokens and the stop token dropped), whether it was cut at max_new_tokens
    instead of ending with a stop token, and the sampled token ids (the stop token included when it stopped)."""

    text: str
    truncated: bool
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def sample_of(ids: list[int], stops: Sequence[int], tokenizer) -> Sample:
    """One generated row (anything after its first stop token, e.g. padding, dropped) as a Sample."""
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    ids = list(ids) if end is None else list(ids[: end + 1])
    return Sample(tokenizer.decode(ids if end is None else ids[:-1], skip_special_tokens=True), end is None, ids)


def partial_path(out_path: Path) -> Path:
    """Where a generation writing ``out_path`` keeps its finished batches until it is done."""
    return out_path.with_name(out_path.name + ".partial")


def _read_partial(path: Path) -> list[dict]:
    done = []
    if not path.exists():
        return done
    with open(path) as f:
        for line in f:
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: everything after it is redone
                break
    return done


def resume_partial(partial: Path | None, chunks: list[list[int]]) -> list[dict]:
    """The lines of `partial` made with this very chunking (a changed batch size or data starts over; so does a
    file without the truncation flags), rewritten in place (a line torn by a kill is dropped), ready for
    `append_partial`."""
    done = _read_partial(partial) if partial else []
    n = 0
    while (n < min(len(done), len(chunks)) and done[n].get("index") == chunks[n]
           and {"text", "truncated", "ids"} <= set(done[n])):
        n += 1
    done = done[:n]
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in done)
    return done


def append_partial(partial: Path | None, chunk: int, index: list[int], samples: list[Sample]) -> None:
    """One finished chunk, flushed and fsynced: a kill never loses it."""
    if partial:
        append_jsonl(partial, {"batch": chunk, "index": index, "text": [s.text for s in samples],
                               "truncated": [s.truncated for s in samples],
                               "ids": [s.token_ids for s in samples]})


def samples_of(line: dict) -> list[Sample]:
    """The samples of one partial-file line."""
    return [Sample(*x) for x in zip(line["text"], line["truncated"], line["ids"])]


def sharded_generate(items: Sequence, generate_fn: Callable[[list], Sequence]) -> list:
    """Run ``generate_fn`` on this rank's share of ``items`` and return every rank's results in ``items`` order.

    Item i goes to rank ``i % world_size``. Every rank gets the same number of items (the short ones repeat their
    last item, and the repeats' results are dropped) because under FSDP2 each forward is a collective: ranks must
    make the same number of ``generate`` calls. ``generate_fn(list_of_items) -> list_of_results`` (same length)
    must be called on every rank; results must be picklable. Returns the full list on every rank.
    """
    if not callable(generate_fn):
        raise TypeError(f"generate_fn: expected a callable taking a list of items, got {type(generate_fn).__name__}")
    items = list(items)
    if not items:  # the same list on every rank: all return here, no collective is left waiting
        return []
    rank, world_size = world()
    mine = list(range(rank, len(items), world_size))
    per_rank = math.ceil(len(items) / world_size)
    local = [items[i] for i in mine] + [items[mine[-1] if mine else 0]] * (per_rank - len(mine))
    out = list(generate_fn(local))
    if len(out) != len(local):
        raise ValueError(f"generate_fn: returned {len(out)} results for {len(local)} items on rank {rank}")
    if world_size == 1:
        return out
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, out[: len(mine)])
    result: list = [None] * len(items)
    for r, outs in enumerate(gathered):
        for j, value in enumerate(outs):
            result[r + j * world_size] = value
    return result
