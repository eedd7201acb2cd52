"""Data: records from any accepted file format (through `datasets`), seeded subsets, prompt formatting and
tokenization into features. The formats: README "Data formats" and docs/contract.md#data-formats.

Truncation (documented contract): a prompt longer than `max_prompt_length` keeps its *last* tokens (the end of an
instruction sits next to the response); the response is then cut at the end to fit `max_length`, and a cut
response loses its EOS. Labels are -100 on prompt tokens and padding, so only response tokens count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tspin_kernels.integrations import triplets
from tspin_kernels.integrations.triplets import IGNORE_INDEX  # noqa: F401 (tspin reads it here)

from .choices import TRUNCATED_SAMPLES

PAPER_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
# Responses sampled by a policy: their records may carry the sampled token ids (<field>_ids, the stop token
# included when the sample stopped) and whether the sample was cut at max_new_tokens (<field>_truncated).
SAMPLED_FIELDS = ("generated", "proto", "generated_prev")


class DataError(ValueError):
    """Malformed data: the message names the file, the line/row and the field."""


# ----------------------------------------------------------------------------- loading
def _load_dataset(path: Path, split: str):
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise DataError(f"{path}: a directory must be a dataset saved with save_to_disk (no dataset_info.json or "
                        "dataset_dict.json found); for data files use a file path or a glob like dir/*.parquet")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: split {split!r} not found (available: {', '.join(ds)})")
            ds = ds[split]
        return ds
    suffix = path.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (expected .jsonl, .json, .parquet or a "
                        "saved dataset directory)")
    files = [path]
    if any(c in path.name for c in "*?["):  # sharded files: every match, in name order
        files = sorted(path.parent.glob(path.name))
        if not files:
            raise FileNotFoundError(f"data files not found: no match for {path}")
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets' own errors rarely name the file or the line: find them ourselves
        if builder == "json":
            for f in files:
                _raise_json_location(f)
        if all(_no_records(f, builder) for f in files):
            ds = None
        else:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{path}: could not be loaded as {builder}: {reason}") from e
    if ds is None or len(ds) == 0:
        raise DataError(f"{path}: holds no records (expected one JSON object per line, a JSON list of objects or "
                        "Parquet rows)")
    return ds


def _no_records(path: Path, builder: str) -> bool:
    """A file with nothing in it for the builder (an empty file, only blank lines, an empty JSON list)."""
    if builder != "json":
        return path.stat().st_size == 0
    text = "".join(_decode_lines(path)).strip()
    return text in ("", "[]")


def _decode_lines(path: Path) -> list[str]:
    """The file's lines as text; a byte that is not UTF-8 raises a DataError naming its line and column."""
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", "replace")) + 1
                raise DataError(f"{path}: line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                                "save the file as UTF-8") from None
    return lines


def _raise_json_location(path: Path) -> None:
    text = "".join(_decode_lines(path))
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
    else:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _locator(path: Path):
    """Row index -> human location: the line of a JSONL file, else the record/row index."""
    if path.is_file() and path.suffix.lower() == ".jsonl":
        lines = [n for n, line in enumerate(_decode_lines(path), 1) if line.strip()]
        return lambda i: f"line {lines[i]}" if i < len(lines) else f"row {i}"
    if path.is_file() and path.suffix.lower() == ".json":
        return lambda i: f"record {i}"
    return lambda i: f"row {i}"


def _text(value, where: str, name: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def first_turn(messages, where: str) -> tuple[str, str | None]:
    """The first user message and the assistant reply that follows it (system messages are skipped)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field 'messages[{i}]' must have 'role' and 'content'")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: field 'messages' has no 'user' turn")
    u = users[0]
    prompt = _text(messages[u]["content"], where, f"messages[{u}].content")
    for j in range(u + 1, len(messages)):
        if messages[j]["role"] == "assistant":
            return prompt, _text(messages[j]["content"], where, f"messages[{j}].content")
        if messages[j]["role"] == "user":
            break
    return prompt, None


def normalize_record(rec: dict, where: str, index: int, require_response: bool = True) -> dict:
    """Any accepted record -> {prompt_id, prompt, real, [generated, proto, generated_prev (each with its sampled
    token ids <field>_ids and <field>_truncated when the file has them), ref_*]}."""
    if rec.get("messages") is not None:
        prompt, real = first_turn(rec["messages"], where)
        if real is None and require_response:
            raise DataError(f"{where}: missing field 'messages' assistant reply after the first user turn")
    else:
        prompt = _text(rec.get("prompt"), where, "prompt")
        key = "real" if rec.get("real") is not None else "response"
        real = _text(rec.get(key), where, "response (or real)", required=require_response)
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    out = {"prompt_id": str(rec["prompt_id"]) if rec.get("prompt_id") is not None else f"{index:08d}",
           "prompt": prompt, "real": real}
    for name in SAMPLED_FIELDS:
        if rec.get(name) is not None:
            out[name] = _text(rec[name], where, name)
            ids, truncated = rec.get(f"{name}_ids"), rec.get(f"{name}_truncated")
            if ids is not None:
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in ids):
                    raise DataError(f"{where}: field '{name}_ids' must be a list of token ids (ints >= 0)")
                out[f"{name}_ids"] = list(ids)
            if truncated is not None:
                if not isinstance(truncated, bool):
                    raise DataError(f"{where}: field '{name}_truncated' must be true or false, got "
                                    f"{type(truncated).__name__}")
                out[f"{name}_truncated"] = truncated
    for name, value in rec.items():
        if name.startswith("ref_") and value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DataError(f"{where}: field {name!r} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):  # a reference log-prob of nan / inf would make every loss of its batch so
                raise DataError(f"{where}: field {name!r} must be a finite number, got {value}")
            out[name] = float(value)
    return out


def load_records(path: str | Path, split: str = "train", require_response: bool = True) -> list[dict]:
    """Load any accepted format (chat messages, prompt/response pairs, the files the project writes) into normalized
    records; malformed ones raise a DataError naming the file, the line/row and the field."""
    path = Path(path)
    if not path.exists() and not any(c in path.name for c in "*?["):
        raise FileNotFoundError(f"data file not found: {path}")
    ds = _load_dataset(path, split)
    where = _locator(path)
    cols = set(ds.column_names)
    if not ({"messages", "prompt"} & cols):
        raise DataError(f"{path}: {where(0)}: missing field 'prompt' (or 'messages'); columns are {sorted(cols)}")
    return [normalize_record(rec, f"{path}: {where(i)}", i, require_response) for i, rec in enumerate(ds)]


def split_heldout(records: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of `size` held-out records (train, eval), both kept in file order."""
    if size <= 0:
        return records, []
    if size >= len(records):
        raise ValueError(f"eval_size={size} leaves no training data ({len(records)} records)")
    perm = np.random.default_rng(seed + 1_000_003).permutation(len(records))
    held = set(perm[:size].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def select_subset(records: list[dict], fraction: float | None = None, count: int | None = None,
                  seed: int = 0) -> list[dict]:
    """Seeded subset by fraction or count, in file order. Smaller subsets are prefixes of one permutation, so the
    25% subset is contained in the 50% one for the same seed."""
    if fraction is None and count is None:
        return records
    n = len(records)
    k = count if count is not None else max(1, round(fraction * n))
    if k > n:
        raise ValueError(f"data_count={k} exceeds the {n} available records")
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    return [records[i] for i in keep]


# ----------------------------------------------------------------------------- tokenization
def format_prompt(tokenizer, prompt: str, template: str) -> str:
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_template='chat' but the tokenizer has no chat_template; use 'paper'")
        try:
            return triplets.render_chat(tokenizer, [{"role": "user", "content": prompt}])
        except ValueError as e:
            raise ValueError(f"{e}, or use prompt_template 'paper'") from None
    return (PAPER_TEMPLATE if template == "paper" else template).replace("{prompt}", prompt)


def end_of_turn_id(tokenizer, template: str) -> int | None:
    """The token a finished response ends with (:func:`tspin_kernels.integrations.triplets.end_of_turn_id`): the
    chat template's end of turn for template 'chat', else the tokenizer's EOS."""
    return triplets.end_of_turn_id(tokenizer, template == "chat")


def stop_token_ids(tokenizer, template: str, generation_config=None) -> list[int]:
    """Every token that ends a sampled response: the model's generation-config EOS ids (an int or a list, e.g.
    Llama-3's <|end_of_text|> and <|eot_id|>), the tokenizer's EOS and the chat template's end-of-turn token."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for extra in (tokenizer.eos_token_id, end_of_turn_id(tokenizer, template)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def encode_prompts(tokenizer, prompts: list[str], template: str, max_prompt_length: int) -> list[list[int]]:
    """The prompt ids a sampler sees: ``prompts`` formatted with ``template``, the last max_prompt_length kept."""
    return triplets.encode_prompts(tokenizer, [format_prompt(tokenizer, p, template) for p in prompts],
                                   chat=template == "chat", max_prompt_length=max_prompt_length)


def build_features(records: list[dict], tokenizer, fields: tuple[str, ...], *, template: str, max_length: int,
                   max_prompt_length: int, ref: bool = False,
                   truncated_samples: str = "keep_without_eos") -> list[dict]:
    """Per record: {prompt_id, <field>: (input_ids, labels) for each field, [ref: {field: logp}]}, tokenized by
    :func:`tspin_kernels.integrations.triplets.tokenize_examples` (what TSPINTrainer runs too).

    The reference response is tokenized jointly with its prompt and ends with the end token (:func:`end_of_turn_id`;
    once: a text that ends with it gets no second one). A sampled response with its token ids (``<field>_ids``) is
    trained on exactly those ids after the prompt ids the sampler saw, its stop token included; a truncated one
    (``<field>_truncated``: cut at max_new_tokens) gets no end token unless `truncated_samples` is 'append_eos'
    ('drop' is the caller's: :func:`drop_truncated`). A sampled response given as text only is tokenized like the
    reference.
    """
    if truncated_samples not in TRUNCATED_SAMPLES:
        raise ValueError(f"truncated_samples={truncated_samples!r}: expected one of {', '.join(TRUNCATED_SAMPLES)}")
    for f in fields:
        missing = [r["prompt_id"] for r in records if r.get(f) is None]
        if missing:
            raise DataError(f"records lack field {f!r} (first prompt_id {missing[0]}, {len(missing)} in all)")
    prompts = [format_prompt(tokenizer, r["prompt"], template) for r in records]
    rows = triplets.tokenize_examples(tokenizer, prompts, records, fields, chat=template == "chat",
                                      max_length=max_length, max_prompt_length=max_prompt_length,
                                      end_truncated=truncated_samples == "append_eos")
    feats = [{"prompt_id": r["prompt_id"], **row} for r, row in zip(records, rows)]
    if ref:
        for feat, r in zip(feats, records):
            try:
                feat["ref"] = {f: r[f"ref_{f}"] for f in fields}
            except KeyError as e:
                raise DataError(f"record {r['prompt_id']}: missing reference log-prob field {e.args[0]!r}") from None
    return feats


@dataclass(frozen=True)
class Tokenization:
    """How records become features: :func:`build_features`' settings."""

    template: str
    max_length: int
    max_prompt_length: int
    truncated_samples: str = "keep_without_eos"

    def features(self, records: list[dict], tokenizer, fields: tuple[str, ...], *, ref: bool = False) -> list[dict]:
        return build_features(records, tokenizer, fields, ref=ref, **asdict(self))


def drop_truncated(records: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The records none of whose sampled `fields` was cut at max_new_tokens (``truncated_samples: drop``)."""
    return [r for r in records if not any(r.get(f"{f}_truncated") for f in fields)]
