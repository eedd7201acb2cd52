"""A trainer state on disk without pickle: a folder with the structure and every number as JSON (``state.json``) and
the tensors in a safetensors file (``tensors.safetensors``).

Reading it runs no code from the file (a pickle can: ``torch.load(weights_only=False)`` on a file someone handed
you executes whatever it names). The state is a tree of dicts, lists, tuples, strings, numbers, booleans, None,
torch tensors and numpy arrays (an optimizer's state dict, a scheduler's, the RNG states, counters); tuples and
non-string dict keys survive the round trip, so ``random.setstate`` and ``optimizer.load_state_dict`` get back
exactly what they gave.

    write_state(ckpt / "trainer_state", tree)    # trainer_state/state.json + trainer_state/tensors.safetensors
    tree = read_state(ckpt / "trainer_state")     # StateFileError (a ValueError naming the file) if damaged

A folder of its own, so that a model directory holding it stays a model directory: vLLM takes every top-level
``*.safetensors`` file of a directory without an index as weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

FORMAT = "tspin-state"
VERSION = 1
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


class StateFileError(ValueError):
    """A state file that is missing, damaged or not tspin's; the message names the file."""


def _encode(value, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}  # nan / inf: not JSON numbers
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a trainer state (dicts, lists, tuples, "
                    "numbers, strings, None, tensors and numpy arrays can)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":  # numbers only: no object arrays
            raise TypeError(f"array dtype {dtype} is not numeric")
        return np.array(value[_ARRAY], dtype=dtype).reshape(value["shape"])
    if "__float__" in value:
        return float(value["__float__"])
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


META_FILE, TENSORS_FILE = "state.json", "tensors.safetensors"


def write_state(directory: str | Path, tree: dict) -> None:
    """Write ``tree`` as ``directory/state.json`` (+ ``tensors.safetensors`` when it holds tensors); the folder is
    created. Not atomic by itself: call it inside :func:`tspin.io.atomic_path`'s temp directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta, tensors_path = directory / META_FILE, directory / TENSORS_FILE
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(tree, tensors, directory.name)
    if tensors:
        save_file(tensors, str(tensors_path))
    meta.write_text(json.dumps({"format": FORMAT, "version": VERSION, "tensors": bool(tensors), "state": body}))


def read_state(directory: str | Path) -> dict:
    """The tree :func:`write_state` wrote. Reads JSON and safetensors only: nothing in the files can run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, tensors_path = Path(directory) / META_FILE, Path(directory) / TENSORS_FILE
    damaged = "the file is damaged or was not written by tspin; delete its checkpoint directory to go back to an " \
              "earlier one"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"{meta}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise StateFileError(f"{meta}: not valid JSON ({e}); {damaged}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), (dict, list)):
        raise StateFileError(f"{meta}: not a tspin trainer state (no '\"format\": \"{FORMAT}\"'); {damaged}")
    if doc.get("version") != VERSION:
        raise StateFileError(f"{meta}: trainer state version {doc.get('version')!r}; this tspin reads version "
                             f"{VERSION}")
    tensors = {}
    if doc.get("tensors"):
        try:
            tensors = load_file(str(tensors_path))
        except FileNotFoundError:
            raise StateFileError(f"{tensors_path}: no such file (its {meta.name} refers to it); {damaged}") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise StateFileError(f"{tensors_path}: not a complete safetensors file ({e}); {damaged}") from None
    try:
        return _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{meta}: malformed entry ({type(e).__name__}: {e}); {damaged}") from None
