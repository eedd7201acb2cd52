"""Atomic file writes: nothing the project writes is ever left half-written (temp file in the same dir + rename).

A write that fails (full disk, read-only or forbidden directory, file size limit) raises :class:`WriteError`, an
OSError that names the path; a process killed mid-write leaves at most a hidden ``.<name>.tspin-XXXXXXXX.tmp``
folder (or, while a directory is being replaced, ``.<name>.tspin-old``), which :func:`clean_stale_temps` removes on
the next start. The ``tspin-`` in those names, and what the folders hold, tell them from anything of the user's:
the cleaner removes nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """Writing a file failed; ``str()`` names the path and the reason (one line)."""

    def __init__(self, path: str | Path, cause: BaseException):
        errno = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or " ".join(str(cause).split()) or type(cause).__name__
        if "unexpected pos" in reason:  # torch.save's writer on a short write: the disk is full (or a size limit)
            reason = f"no space left on the device or a file size limit reached (torch.save: {reason})"
        if getattr(cause, "filename", None) is not None and str(cause.filename) != str(path):
            reason += f" ({cause.filename})"
        try:
            free = shutil.disk_usage(_existing_parent(Path(path))).free
            reason += f"; {free / 2**20:.0f} MiB free on its disk"
        except OSError:
            pass
        super().__init__(errno, f"could not write {path}: {reason}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError (no space, permissions), torch.save's RuntimeError (its writer reports a
    short write as "unexpected pos"), safetensors' own error type."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return OSError, RuntimeError
    return OSError, RuntimeError, SafetensorError


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temp path next to `path`; on success it replaces `path` (a file or a directory) in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TAG}", suffix=".tmp", dir=path.parent)) / ("x" + suffix)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        try:
            yield tmp
        except _write_errors() as e:
            if isinstance(e, WriteError):
                raise
            raise WriteError(path, e) from e
        if path.is_dir() and not path.is_symlink():
            # a dir cannot be replaced in one rename: move the old one aside first, drop it after (a kill between
            # the two renames leaves only .<name>.tspin-old, which clean_stale_temps puts back)
            old = path.with_name(f".{path.name}.{_TAG}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | Path, mapping: dict) -> None:
    """A mapping as YAML, keys in their order (a run's config.yaml)."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(mapping, sort_keys=False))


def atomic_write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line, flushed and fsynced (a kill leaves at most that line torn; readers skip it)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, e) from e


def read_json(path: str | Path, what: str = "file"):
    """A JSON file tspin wrote; one that does not parse raises a ValueError naming it (written atomically, it can
    only be damaged from outside: a truncated copy, an edit)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); this {what} is written by tspin and was changed or cut "
                         "since: delete it and run again to rewrite it") from None


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
    return rows


# atomic_path's leftovers: tempfile.mkdtemp's 8 random characters after the tag, and a directory moved aside while
# replaced. The tag marks them as this writer's: a user's ".notes.old" or ".cache.abcd1234.tmp" never matches.
_TAG = "tspin-"
_TEMP = re.compile(rf"^\.(?P<name>.+)\.{_TAG}[a-z0-9_]{{8}}\.tmp$")
_OLD = re.compile(rf"^\.(?P<name>.+)\.{_TAG}old$")


def temp_target(name: str) -> str | None:
    """The name whose atomic write left the temp folder ``name`` (``.<target>.tspin-...``), else None."""
    m = _TEMP.match(name) or _OLD.match(name)
    return m["name"] if m else None


def _is_our_temp(p: Path) -> bool:
    """A temp folder as atomic_path makes it: a real directory (not a link) holding nothing or its one 'x...' entry."""
    if p.is_symlink() or not p.is_dir():
        return False
    inside = list(p.iterdir())
    return len(inside) <= 1 and all(c.name.startswith("x") for c in inside)


def clean_stale_temps(root: str | Path, names: set[str] | None = None,
                      descend: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove what killed atomic writes left in ``root`` (only the temps of the targets in ``names`` when given),
    and in the subfolders (at any depth) whose names ``descend`` accepts (none by default): temp folders are deleted,
    and a ``.<name>.tspin-old`` folder is put back as ``<name>`` when a kill between the two renames left ``<name>``
    missing (it is the last complete version), else deleted. Only names atomic_path makes are touched, and only
    when they hold what it puts there. Returns the paths removed or restored. Call it before anything writes under
    ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for parent, dirs, _ in os.walk(root):  # does not follow links
        for d in list(dirs):
            m = _TEMP.match(d) or _OLD.match(d)
            if m is None or (names is not None and m["name"] not in names):
                continue
            dirs.remove(d)  # do not descend into it
            stale, target = Path(parent, d), Path(parent, m["name"])
            if m.re is _OLD and stale.is_dir() and not stale.is_symlink():
                if not target.exists():
                    os.replace(stale, target)
                else:
                    shutil.rmtree(stale)
            elif m.re is _TEMP and _is_our_temp(stale):
                shutil.rmtree(stale)
            else:
                continue
            found.append(stale)
        dirs[:] = [d for d in dirs if descend is not None and descend(d)]
    return found
