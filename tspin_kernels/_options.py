"""The kernels' keyword options, checked: each error names the argument and what was expected.

Only the explicit values are checked here; what a ``None`` stands for is decided in ``_defaults``, which uses these
checks for the environment variables too (so this module imports nothing of the package).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

IMPLS = ("auto", "triton", "torch", "reference")
BACKWARDS = ("atomic", "matmul")
TILE_KERNELS = ("fwd", "bwd")
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_choice(value, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{what}: expected one of {choices}, got {value!r}")
    return value


def check_impl(value, what: str = "impl") -> str:
    return _check_choice(value, IMPLS, what)


def check_backward(value, what: str = "backward") -> str:
    return _check_choice(value, BACKWARDS, what)


def check_grad_filter_eps(value, what: str = "grad_filter_eps") -> float:
    expected = f"{what}: expected a float in [0, 1) (0 = exact gradients), got {value!r}"
    if not _is_number(value):
        raise TypeError(expected)
    if not 0.0 <= float(value) < 1.0:  # NaN fails this too
        raise ValueError(expected)
    return float(value)


def check_chunk_elements(value, what: str = "chunk_elements") -> int:
    expected = f"{what}: expected a positive int (float32 logit elements per chunk), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(expected)
    if value < 1:
        raise ValueError(expected)
    return int(value)


def parse_tiles(value, what: str) -> dict:
    """One kernel's tiles as a dict of TILE_KEYS, from ``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"`` (e.g.
    ``"64,128,64,8,3"``), a sequence of those five ints, or a mapping with exactly those keys."""
    if isinstance(value, str):
        try:
            vals = [int(x) for x in value.split(",")]
        except ValueError:
            vals = []
    elif isinstance(value, Mapping):
        vals = [value[k] for k in TILE_KEYS] if set(value) == set(TILE_KEYS) else []
    elif isinstance(value, Sequence):
        vals = list(value)
    else:
        raise TypeError(f"{what}: expected 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages', a sequence of those "
                        f"five ints or a dict with keys {TILE_KEYS}, got {type(value).__name__}")
    ok = (len(vals) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
          and all(v >= 16 and v & (v - 1) == 0 for v in vals[:3]) and vals[3] in (1, 2, 4, 8, 16)
          and 1 <= vals[4] <= 8)
    if not ok:
        raise ValueError(f"{what} must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages' with block sizes powers of "
                         f"two >= 16, num_warps in 1..16 (a power of two) and num_stages in 1..8, got {value!r}")
    return dict(zip(TILE_KEYS, vals))


def check_tiles(tiles) -> dict:
    """``tiles``: None or a mapping {"fwd": ..., "bwd": ...} (either key optional) -> {kernel: dict}."""
    if tiles is None:
        return {}
    if not isinstance(tiles, Mapping):
        raise TypeError(f"tiles: expected None or a dict {{'fwd': ..., 'bwd': ...}}, got {type(tiles).__name__}")
    unknown = set(tiles) - set(TILE_KERNELS)
    if unknown:
        raise ValueError(f"tiles: keys must be among {TILE_KERNELS}, got {sorted(map(str, unknown))}")
    return {k: parse_tiles(v, f"tiles[{k!r}]") for k, v in tiles.items() if v is not None}


def check_options(backward=None, grad_filter_eps=None, tiles=None, chunk_elements=None) -> None:
    """Check the explicit options only (no environment): for constructors that resolve at call time."""
    if backward is not None:
        check_backward(backward)
    if grad_filter_eps is not None:
        check_grad_filter_eps(grad_filter_eps)
    check_tiles(tiles)
    if chunk_elements is not None:
        check_chunk_elements(chunk_elements)


def check_fused(value, what: str = "fused") -> bool | None:
    """``fused`` of tspin_loss / spin_loss: None (the default), True or False."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{what}: expected None, True or False, got {value!r}")
    return value


def check_seq_counts(value, num_seqs: int) -> tuple[int, ...] | None:
    """``seq_counts`` of tspin_loss / spin_loss: None, or each sequence's number of counted positions as host
    integers (a list, tuple or CPU tensor of ``num_seqs`` non-negative ints). Free: nothing on a device is read."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.dim() != 1 or value.dtype.is_floating_point \
                or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"seq_counts: expected host integers (a list, tuple or 1-D CPU integer tensor), got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        raise TypeError(f"seq_counts: expected a list or tuple of ints, got {type(value).__name__}")
    if len(value) != num_seqs:
        raise ValueError(f"seq_counts: expected one count per sequence ({num_seqs}), got {len(value)}")
    if any(v < 0 for v in value):
        raise ValueError(f"seq_counts: counts must be >= 0, got {min(value)}")
    return tuple(int(v) for v in value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


# The loss scales (T-SPIN's alpha and beta, SPIN's beta / lambda) are at most this in absolute value: the loss
# l(alpha * margin) + beta * l(alpha * margin') is computed in float32, and with |alpha|, |beta| <= 1e6 it stays
# finite for every margin below 1e26 nats (a sum of log-probs never comes near); alpha=1e39 would make it inf.
# tspin's config checks its keys with this same function.
MAX_LOSS_SCALE = 1e6


def check_real(name: str, value) -> float:
    """A loss scale (alpha / beta / lambda): a finite Python number (bool excluded) with |value| <= MAX_LOSS_SCALE."""
    if not _is_number(value) or not math.isfinite(value) or abs(value) > MAX_LOSS_SCALE:
        raise (ValueError if _is_number(value) else TypeError)(
            f"{name}: expected a finite number with |{name}| <= {MAX_LOSS_SCALE:g} (a larger scale overflows the "
            f"float32 loss), got {value!r}")
    return float(value)
