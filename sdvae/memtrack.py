"""Peak bytes of live tensors during a call, on any device (the CPU included).

CUDA reports its allocator's peak (``torch.cuda.max_memory_allocated``); the CPU has no such
counter. ``TensorMemory`` is a ``TorchDispatchMode`` that sees every tensor an op returns,
counts the bytes of each storage it allocates once (outputs that share an input's storage --
views, in-place ops, ``out=`` -- are not new), and uncounts them when the storage is freed (a
weakref finalizer on the storage object, which PyTorch keeps alive as long as the storage
lives). So ``peak`` is the most bytes held at once by tensors created inside the ``with``
block -- inputs and weights created before it are not counted, the output is -- the same
quantity as the bench's CUDA ``peak_mem_mb``. Before a new peak is recorded the cyclic
garbage collector runs (``collect=True``): storages that only reference cycles keep alive
(Triton's interpreter leaves its launch arguments in such cycles) would be freed at once on
a GPU run. Memory a C++ kernel allocates and frees inside one op (oneDNN scratch, cuDNN
workspaces) is not seen; the stream planner's estimates are
checked against this count on the CPU, and against the CUDA allocator on a GPU.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemory", "peak_bytes"]


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory() as m: ...``; then ``m.peak`` (bytes) and ``m.current``."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        timeline: bool = False,
        collect: bool = True,
    ):
        super().__init__()
        self.collect = collect
        self.device = None if device is None else torch.device(device).type
        self.current = 0
        self.peak = 0
        #: with ``timeline=True``: the bytes held after every allocation and free, and the
        #: peaks of ``spike`` calls, in order
        self.timeline: list[int] | None = [] if timeline else None
        self._live: dict[int, weakref.finalize] = {}

    def _note(self, value: int) -> None:
        self.peak = max(self.peak, value)
        if self.timeline is not None:
            self.timeline.append(value)

    def spike(self, nbytes: int) -> None:
        """Count ``nbytes`` held for a moment on top of the current bytes: memory an op
        allocates and frees inside itself, which no tensor shows (e.g. a C++ kernel's copy)."""
        self._note(self.current + nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes
            if self.timeline is not None:
                self.timeline.append(self.current)

    def _see(self, t: torch.Tensor, inputs: set) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live or key in inputs:  # a view, an in-place op or out=: not new
            return
        nbytes = st.nbytes()
        self._live[key] = weakref.finalize(st, self._free, key, nbytes)
        self.current += nbytes
        if self.current > self.peak and self.collect:
            gc.collect(1)  # storages only young reference cycles hold: garbage, not in use
        self._note(self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                inputs.add(t.untyped_storage()._cdata)
            elif isinstance(t, torch.UntypedStorage):  # e.g. set_(storage): a view of it
                inputs.add(t._cdata)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t, inputs)
        return out

    def __exit__(self, *exc):
        for fin in list(self._live.values()):
            fin.detach()
        self._live.clear()
        return super().__exit__(*exc)


def peak_bytes(fn, device=None):
    """``(fn(), peak)``: the call's result and the most bytes its tensors held at once."""
    with TensorMemory(device) as m:
        out = fn()
    return out, m.peak
