"""Everything that inspects the hardware or the runtime lives here, and nowhere else."""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "torch", "reference")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_can_run(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors living where ``t`` lives."""
    if not triton_importable():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting()


def resolve_impl(impl: str, t: torch.Tensor) -> str:
    """Turn the user's ``impl`` (and ``TSPIN_IMPL`` for ``"auto"``) into a concrete implementation."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get("TSPIN_IMPL", "").strip().lower()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"TSPIN_IMPL must be one of {IMPLS}, got {env!r}")
            impl = env
        else:
            impl = "triton" if (t.is_cuda and triton_importable()) else "torch"
    if impl == "triton" and not triton_can_run(t):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import); "
            f"got tensors on {t.device}. Use impl='torch' or impl='auto'."
        )
    if impl == "triton" and not t.is_cuda:
        _check_interpreter()
    return impl


def _check_interpreter() -> None:
    from .kernels.interpreter_probe import interpreter_error

    err = interpreter_error()
    if err is not None:
        import numpy
        import triton

        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run kernels with numpy "
            f"{numpy.__version__} ({err}). Use numpy<2.4 with this Triton, a newer Triton (3.9 works), or "
            f"impl='torch'."
        )


def device_name(device: torch.device | None = None) -> str:
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return "cpu"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Largest shared memory one block may opt into, by compute capability (CUDA programming guide), for torch builds
# whose device properties lack ``shared_memory_per_block_optin``.
_SHARED_OPTIN = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
                 (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}


def shared_memory_limit(capability: tuple[int, int], device: torch.device | None = None) -> int:
    """Bytes of shared memory a kernel block may use on this GPU (the device's own figure when torch has it)."""
    if device is not None and device.type == "cuda":
        optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
    return _SHARED_OPTIN.get(tuple(capability), 101376 if capability[0] >= 8 else 65536)


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def parse_tiles(raw: str, what: str) -> dict:
    """``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"`` (e.g. ``"64,128,64,8,3"``) -> a tile config dict."""
    try:
        vals = [int(x) for x in raw.split(",")]
    except ValueError:
        vals = []
    ok = (len(vals) == 5 and all(v >= 16 and v & (v - 1) == 0 for v in vals[:3])
          and vals[3] in (1, 2, 4, 8, 16) and 1 <= vals[4] <= 8)
    if not ok:
        raise ValueError(f"{what} must be 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages' with block sizes powers of "
                         f"two >= 16, num_warps in 1..16 (a power of two) and num_stages in 1..8, got {raw!r}")
    return dict(zip(TILE_KEYS, vals))


def tile_override(kernel: str) -> dict | None:
    """``TSPIN_TILES_FWD`` / ``TSPIN_TILES_BWD``: tiles for the forward / backward kernel instead of the built-in
    per-GPU choice (for GPUs we have not tuned; ``python -m benchmarks.tile_sweep`` finds them)."""
    var = f"TSPIN_TILES_{kernel.upper()}"
    raw = os.environ.get(var, "").strip()
    return parse_tiles(raw, var) if raw else None


BACKWARDS = ("atomic", "matmul")


def backward_strategy() -> str:
    """``TSPIN_BACKWARD``: how the Triton path computes gradients. ``atomic`` (default): one fused kernel adds
    every logit tile's contributions with float32 atomics, the leanest in memory. ``matmul``: a kernel writes
    dlogits per (vocab slice, row chunk) and cuBLAS does the two products, with no atomics (tens of MiB more)."""
    raw = os.environ.get("TSPIN_BACKWARD", "atomic").strip().lower() or "atomic"
    if raw not in BACKWARDS:
        raise ValueError(f"TSPIN_BACKWARD must be one of {BACKWARDS}, got {raw!r}")
    return raw


def grad_filter_eps() -> float:
    """``TSPIN_GRAD_FILTER``: softmax threshold under which the Triton backward skips a vocab tile (0 = off)."""
    raw = os.environ.get("TSPIN_GRAD_FILTER", "0").strip()
    try:
        eps = float(raw)
    except ValueError:
        raise ValueError(f"TSPIN_GRAD_FILTER must be a float in [0, 1), got {raw!r}") from None
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"TSPIN_GRAD_FILTER must be a float in [0, 1), got {raw!r}")
    return eps


def allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)
