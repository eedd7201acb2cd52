"""The one place where environment variables reach the library: they set the *defaults* of keyword options.

Every public function takes its options as keyword arguments (``impl``, ``backward``, ``grad_filter_eps``,
``tiles``, ``chunk_elements``). An argument left at ``None`` (``"auto"`` for ``impl``) is resolved here, when the
call runs: the variable below if it is set, else the built-in default. An explicit argument always wins.

=========================  ==============================  ==========================================
variable                   default of                      built-in default
=========================  ==============================  ==========================================
``TSPIN_IMPL``             ``impl="auto"``                 triton on CUDA tensors, torch elsewhere
``TSPIN_BACKWARD``         ``backward=None``               ``"atomic"``
``TSPIN_GRAD_FILTER``      ``grad_filter_eps=None``        ``0.0`` (off)
``TSPIN_TILES_FWD/BWD``    ``tiles=None`` (per kernel)     the built-in per-GPU tiles
``TSPIN_CHUNK_ELEMENTS``   ``chunk_elements=None``         ``2**23`` (32 MiB of float32 logits); the
                                                           fused loss path's cap: ``2**28`` (1 GiB)
``TSPIN_FUSED``            ``fused=None`` (tspin_loss,     ``auto``: fused for ``impl="torch"``, not
                           spin_loss)                      for ``impl="triton"``
=========================  ==============================  ==========================================

A malformed variable raises a ``ValueError`` naming the variable. (``TRITON_INTERPRET`` is Triton's own switch,
read in ``_device``.)
"""

from __future__ import annotations

import os

from . import _options

ENV_VARS = ("TSPIN_IMPL", "TSPIN_BACKWARD", "TSPIN_GRAD_FILTER", "TSPIN_TILES_FWD", "TSPIN_TILES_BWD",
            "TSPIN_CHUNK_ELEMENTS", "TSPIN_FUSED")

# Logit elements per chunk of the torch path (float32): 2**23 elements = 32 MiB. Large enough for good matmuls,
# small enough that the chunk never dominates memory.
CHUNK_ELEMENTS = 1 << 23
# The fused loss path's cap on a chunk of whole triplets (pairs): 2**28 float32 logits = 1 GiB, so that a triplet
# of ~1500 response tokens at V=128k (or ~5000 at V=50k) is still done in one pass (3 units of work, not 4).
FUSED_CHUNK_ELEMENTS = 1 << 28


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _parse(raw: str, kind, var: str, expected: str):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{var}: expected {expected}, got {raw!r}") from None


def impl() -> str | None:
    """``TSPIN_IMPL``: the implementation ``impl="auto"`` stands for, or None (choose by device)."""
    raw = _env("TSPIN_IMPL").lower()
    if not raw or raw == "auto":
        return None
    return _options.check_impl(raw, "TSPIN_IMPL")


def backward() -> str:
    raw = _env("TSPIN_BACKWARD").lower()
    return _options.check_backward(raw, "TSPIN_BACKWARD") if raw else "atomic"


def grad_filter_eps() -> float:
    raw = _env("TSPIN_GRAD_FILTER")
    if not raw:
        return 0.0
    return _options.check_grad_filter_eps(_parse(raw, float, "TSPIN_GRAD_FILTER", "a float in [0, 1)"),
                                          "TSPIN_GRAD_FILTER")


def tiles(kernel: str) -> dict | None:
    """``TSPIN_TILES_FWD`` / ``TSPIN_TILES_BWD`` (``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"``), or None."""
    var = f"TSPIN_TILES_{kernel.upper()}"
    raw = _env(var)
    return _options.parse_tiles(raw, var) if raw else None


def chunk_elements() -> int:
    raw = _env("TSPIN_CHUNK_ELEMENTS")
    if not raw:
        return CHUNK_ELEMENTS
    return _options.check_chunk_elements(_parse(raw, int, "TSPIN_CHUNK_ELEMENTS", "a positive int"),
                                         "TSPIN_CHUNK_ELEMENTS")


def fused_chunk_elements() -> int:
    """The fused loss path's ``chunk_elements`` default: ``TSPIN_CHUNK_ELEMENTS`` if set, else 2**28."""
    return chunk_elements() if _env("TSPIN_CHUNK_ELEMENTS") else FUSED_CHUNK_ELEMENTS


def fused() -> bool | None:
    """``TSPIN_FUSED``: ``1``/``true`` or ``0``/``false`` force the fused loss path on or off; unset or ``auto``:
    None (on for ``impl="torch"``, off for ``impl="triton"``)."""
    raw = _env("TSPIN_FUSED").lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true"):
        return True
    if raw in ("0", "false"):
        return False
    raise ValueError(f"TSPIN_FUSED: expected auto, 1, true, 0 or false, got {raw!r}")
