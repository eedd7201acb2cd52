"""Count host syncs on the CPU: the operations that, on CUDA, make the host wait for the device.

A ``TorchDispatchMode`` sees every ATen operation (forward and backward) and counts those whose result size or
value the host must read: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()``), ``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without
``output_size``, ``equal``. ``Tensor.tolist`` / ``.cpu`` / ``.numpy`` copy device memory to the host without a
dispatched op on CPU, so they are counted by wrapping the methods. ``paused()`` stops counting (for code that is
not ours, e.g. a transformers backbone, or Triton's CPU interpreter running a kernel).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim.default: "unique",
    aten.is_nonzero.default: "item",
}
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_HOST_COPIES = ("tolist", "cpu", "numpy")


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self._paused = 0
        self._patches = contextlib.ExitStack()

    def _count(self, name: str) -> None:
        if not self._paused:
            self.syncs[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALWAYS:
            self._count(_ALWAYS[func])
        elif func in _MASK_INDEXING and any(_is_mask(i) for i in (args[1] or ())):
            self._count("mask_indexing")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._count("repeat_interleave")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self):
        for name in _HOST_COPIES:
            real = getattr(torch.Tensor, name)

            def wrapper(t, *a, _real=real, _name=name, **k):
                self._count(_name)
                return _real(t, *a, **k)

            self._patches.enter_context(_patched(torch.Tensor, name, wrapper))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)

