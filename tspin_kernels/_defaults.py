"""The one place where environment variables reach the library, and where every default of a call is decided.

Every public function takes its options as keyword arguments (``impl``, ``fused``, ``backward``,
``grad_filter_eps``, ``tiles``, ``chunk_elements``). An argument left at ``None`` (``"auto"`` for ``impl``) is
resolved here, when the call runs: the variable below if it is set, else the built-in default for the device type
the tensors live on (:func:`builtin_path`). An explicit argument always wins. :func:`resolve_path` does the whole
resolution (keyword, then variable, then built-in) in one function of the device *type*, so it is the same on a
machine without a GPU; ``_device`` hands it the type and whether Triton imports (the hardware is inspected there).

=========================  ==============================  ==========================================
variable                   default of                      built-in default
=========================  ==============================  ==========================================
``TSPIN_IMPL``             ``impl="auto"``                 triton on CUDA tensors, torch elsewhere
``TSPIN_FUSED``            ``fused=None`` (tspin_loss,     ``True`` (the fused loss path), except
                           spin_loss,                      ``impl="triton"`` off CUDA (Triton's CPU
                           tspin_no_history_loss)          interpreter) and ``impl="reference"``
``TSPIN_BACKWARD``         ``backward=None``               ``"matmul"`` on CUDA, ``"atomic"`` elsewhere;
                                                           ``"atomic"`` whenever ``grad_filter_eps > 0``
``TSPIN_GRAD_FILTER``      ``grad_filter_eps=None``        ``0.0`` (off)
``TSPIN_TILES_FWD/BWD``    ``tiles=None`` (per kernel)     the built-in per-GPU tiles
``TSPIN_CHUNK_ELEMENTS``   ``chunk_elements=None``         the recompute torch path: ``2**28`` (1 GiB of
                                                           float32 logits) on CUDA, ``2**23`` (32 MiB)
                                                           elsewhere; the fused loss path's cap:
                                                           ``2**28`` everywhere
=========================  ==============================  ==========================================

``fused=None`` also means the recompute path when the call names an option that only that path has: an explicit
``backward=`` or ``grad_filter_eps > 0``.

A malformed variable raises a ``ValueError`` naming the variable. (``TRITON_INTERPRET`` is Triton's own switch,
read in ``_device``.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _options

ENV_VARS = ("TSPIN_IMPL", "TSPIN_BACKWARD", "TSPIN_GRAD_FILTER", "TSPIN_TILES_FWD", "TSPIN_TILES_BWD",
            "TSPIN_CHUNK_ELEMENTS", "TSPIN_FUSED")

# Logit elements per chunk of the recompute torch path (float32) on the CPU: 2**23 elements = 32 MiB. Large enough
# for good CPU matmuls, small enough that the chunk never dominates memory.
CHUNK_ELEMENTS = 1 << 23
# The same on CUDA: 2**28 (1 GiB, the fused path's cap). 2**23 is 65 rows a chunk at V=128k, so every chunk read
# the whole 1 GiB head again for a 65-row product: that path took 362 ms at llama3-8b on an H200, 7x the fused path
# (benchmarks/results/h200-20261204-ec8b2c3-llama3.json, impl torch_recompute).
CUDA_CHUNK_ELEMENTS = 1 << 28
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


def env_impl() -> str | None:
    """``TSPIN_IMPL``: the implementation ``impl="auto"`` stands for, or None (choose by device)."""
    raw = _env("TSPIN_IMPL").lower()
    if not raw or raw == "auto":
        return None
    return _options.check_impl(raw, "TSPIN_IMPL")


def env_backward() -> str | None:
    """``TSPIN_BACKWARD``, or None (the built-in default)."""
    raw = _env("TSPIN_BACKWARD").lower()
    return _options.check_backward(raw, "TSPIN_BACKWARD") if raw else None


def env_grad_filter_eps() -> float:
    raw = _env("TSPIN_GRAD_FILTER")
    if not raw:
        return 0.0
    return _options.check_grad_filter_eps(_parse(raw, float, "TSPIN_GRAD_FILTER", "a float in [0, 1)"),
                                          "TSPIN_GRAD_FILTER")


def env_tiles(kernel: str) -> dict | None:
    """``TSPIN_TILES_FWD`` / ``TSPIN_TILES_BWD`` (``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"``), or None."""
    var = f"TSPIN_TILES_{kernel.upper()}"
    raw = _env(var)
    return _options.parse_tiles(raw, var) if raw else None


def env_chunk_elements() -> int | None:
    """``TSPIN_CHUNK_ELEMENTS``, or None (the built-in default of the path that runs)."""
    raw = _env("TSPIN_CHUNK_ELEMENTS")
    if not raw:
        return None
    return _options.check_chunk_elements(_parse(raw, int, "TSPIN_CHUNK_ELEMENTS", "a positive int"),
                                         "TSPIN_CHUNK_ELEMENTS")


def env_fused() -> bool | None:
    """``TSPIN_FUSED``: ``1``/``true`` or ``0``/``false`` force the fused loss path on or off; unset or ``auto``:
    None (the built-in default)."""
    raw = _env("TSPIN_FUSED").lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true"):
        return True
    if raw in ("0", "false"):
        return False
    raise ValueError(f"TSPIN_FUSED: expected auto, 1, true, 0 or false, got {raw!r}")


# ---------------------------------------------------------------------------------------------- the resolution
@dataclass(frozen=True)
class LossPath:
    """The path a call takes: what :func:`resolve_path` made of its keywords, the variables and the built-ins.

    ``fused`` is the losses' choice (``tspin_loss``, ``spin_loss``, ``tspin_no_history_loss``): gradients formed in
    the forward, 3 units of work. ``sequence_logps`` alone always runs the recompute path (its log-probs have their
    own backward), with ``backward`` (Triton) or ``chunk_elements`` (torch). ``chunk_elements`` is the fused path's
    cap when ``fused``, else the recompute torch path's chunk."""

    impl: str  # "triton" | "torch" | "reference"
    fused: bool
    backward: str  # "atomic" | "matmul": the Triton recompute path's backward
    grad_filter_eps: float  # the atomic backward's gradient filter (0 = exact)
    chunk_elements: int


def builtin_path(device_type: str, impl: str | None = None, *, triton: bool = True) -> LossPath:
    """The built-in defaults for tensors on ``device_type`` ("cuda", "cpu", ...), with ``impl`` if one is chosen
    (None: the device's own), ``triton`` whether Triton imports. The variables and keywords aside.

    CUDA, measured on one H200 at commit ec8b2c3, bf16, forward+backward with a trainable head, at qwen2.5-1.5b /
    mistral-7b / llama3-8b (benchmarks/results/h200-20261204-ec8b2c3-{qwen,mistral,llama3}.json):

    - the fused path on Triton (``triton_fused``): 20.0 / 12.0 / 49.4 ms, the fastest of every path and peer;
    - the recompute path's Triton backwards: ``matmul`` 31.8 / 16.1 / 63.3 ms, ``atomic`` 65.3 / 37.0 / 143.4 ms
      (the atomic one was the default until then: 2.9x the fused path at llama3-8b);
    - the torch path fused: 27.4 / 13.3 / 59.0 ms.

    So on CUDA: triton, fused, and the matmul backward where log-probs need their own backward. Elsewhere: the
    torch path fused (1.50x the recompute torch path at D=1024, V=50k on the CPU, benchmarks/results/
    cpu-20261202.json); Triton's CPU interpreter (tests and debugging, never timed) keeps the recompute path and the
    atomic backward, the kernels its tests check.
    """
    cuda = device_type == "cuda"
    if impl is None:
        impl = "triton" if cuda and triton else "torch"
    fused = impl == "torch" or (impl == "triton" and cuda)
    return LossPath(impl=impl, fused=fused, backward="matmul" if cuda else "atomic", grad_filter_eps=0.0,
                    chunk_elements=_chunk(device_type, fused))


def _chunk(device_type: str, fused: bool) -> int:
    """The fused path's cap where it runs, else the recompute torch path's chunk for this device type."""
    if fused:
        return FUSED_CHUNK_ELEMENTS
    return CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS


def resolve_path(device_type: str, *, triton: bool = True, impl: str = "auto", fused: bool | None = None,
                 backward: str | None = None, grad_filter_eps: float | None = None,
                 chunk_elements: int | None = None) -> LossPath:
    """The path of a call on tensors of ``device_type``: each option from its keyword, else its variable, else the
    built-in default (:func:`builtin_path`). Checks every keyword (errors name the argument) and variable (errors
    name the variable). Whether Triton can run there is ``_device``'s to check."""
    impl = _options.check_impl(impl)
    builtin = builtin_path(device_type, env_impl() if impl == "auto" else impl, triton=triton)
    fused = _options.check_fused(fused)
    if backward is not None:
        backward = _options.check_backward(backward)
    asked_eps = None if grad_filter_eps is None else _options.check_grad_filter_eps(grad_filter_eps)
    eps = env_grad_filter_eps() if asked_eps is None else asked_eps
    if chunk_elements is not None:
        chunk_elements = _options.check_chunk_elements(chunk_elements)

    if builtin.impl == "reference":
        if fused:
            raise ValueError("fused: impl='reference' is the full-logits oracle and has no fused path; use fused=None "
                             "or False with it")
        fused = False
    elif fused is None and (backward is not None or (asked_eps or 0.0) > 0):
        fused = False  # an option only the recompute path has, asked for by keyword: that path runs
    elif fused is None:
        fused = env_fused()
        fused = builtin.fused if fused is None else fused
    if backward is None:  # the gradient filter exists in the atomic backward only
        backward = env_backward() or ("atomic" if eps > 0 else builtin.backward)
    if backward == "matmul" and eps > 0:
        raise ValueError(f"grad_filter_eps: skips tiles of the atomic backward only; got {eps} with "
                         "backward='matmul' (set grad_filter_eps=0 or backward='atomic')")
    if chunk_elements is None:
        chunk_elements = env_chunk_elements()
    if chunk_elements is None:
        chunk_elements = _chunk(device_type, fused)
    return LossPath(impl=builtin.impl, fused=fused, backward=backward, grad_filter_eps=eps,
                    chunk_elements=chunk_elements)


@dataclass(frozen=True)
class KernelOptions:
    """What travels with a kernel's autograd Function, so the backward autograd runs later uses the options of the
    forward that recorded it."""

    backward: str  # "atomic" | "matmul" (Triton path)
    grad_filter_eps: float  # Triton atomic backward; 0 = exact
    tiles_fwd: dict | None  # None: the built-in per-GPU tiles
    tiles_bwd: dict | None
    chunk_elements: int  # torch path: float32 logit elements per chunk


def kernel_options(path, tiles=None) -> KernelOptions:
    """What travels with a kernel's autograd Function: the resolved path's (:class:`LossPath`) backward,
    gradient filter and chunk, and the tiles (each kernel's keyword, else its variable, else None: built in)."""
    explicit = _options.check_tiles(tiles)
    per_kernel = {k: explicit[k] if k in explicit else env_tiles(k) for k in _options.TILE_KERNELS}
    return KernelOptions(path.backward, path.grad_filter_eps, per_kernel["fwd"], per_kernel["bwd"],
                         path.chunk_elements)


def resolve_options(backward=None, grad_filter_eps=None, tiles=None, chunk_elements=None) -> KernelOptions:
    """The options of a recompute-path call on the CPU (explicit ones checked, ``None`` ones from the variables or
    built in): for code and tests that apply a kernel Function directly."""
    path = resolve_path("cpu", impl="torch", fused=False, backward=backward, grad_filter_eps=grad_filter_eps,
                        chunk_elements=chunk_elements)
    return kernel_options(path, tiles)
