"""Everything that inspects the hardware or the runtime lives here, and nowhere else."""

from __future__ import annotations

import functools
import os

import torch

from . import _defaults


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


def triton_can_run(t: torch.Tensor | torch.device) -> bool:
    """Whether the Triton kernels can run on tensors living where ``t`` lives (a tensor or a device)."""
    device = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def loss_path(device, *, impl: str = "auto", fused: bool | None = None, backward: str | None = None,
              grad_filter_eps: float | None = None, chunk_elements: int | None = None) -> _defaults.LossPath:
    """The path a call on tensors living on ``device`` (a device, its name, or a tensor) takes with these keywords:
    ``_defaults.resolve_path`` for this device's type, then a clear error if Triton cannot run there."""
    device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    path = _defaults.resolve_path(device.type, triton=triton_importable(), impl=impl, fused=fused, backward=backward,
                                  grad_filter_eps=grad_filter_eps, chunk_elements=chunk_elements)
    if path.impl == "triton" and not triton_can_run(device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import); "
            f"got tensors on {device}. Use impl='torch' or impl='auto'."
        )
    if path.impl == "triton" and device.type != "cuda":
        _check_interpreter()
    return path


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


def allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


@functools.cache
def mm_out_dtype_works() -> bool:
    """Whether this torch multiplies 16-bit CUDA matrices with a float32 result (``torch.mm(..., out_dtype=)``)."""
    try:
        x = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False
