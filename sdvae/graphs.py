"""CUDA graphs for a ``VAE``'s encoder and decoder: ``sdvae.optimize(vae, cuda_graph=True)``.

A decode of a 512² image is a few hundred kernel launches of a few microseconds each: the
launches, not the GPU, set its time. A CUDA graph records them once and replays them with one
launch. ``GraphedCall`` keeps one graph per input signature (shape, strides, dtype, device):
the first call with a new signature warms the function up on a side stream (cuDNN's algorithm
choice, Triton's compile and autotune, the attention backend's one-time measurement happen
there), then captures it; every later call copies the input into the graph's static input,
replays, and returns a copy of the static output (so a result is never overwritten by the
next call). The key also holds the TF32 and determinism switches (a graph freezes them); at
most 8 graphs are kept per call, least recently used dropped first, in one shared memory
pool.

What is graphed, and what is not:
* ``decode``: the whole decoder after the argument checks (unscaling, post_quant_conv,
  decoder).
* ``encode``: the encoder and quant_conv (``VAE.moments``). The sampling step runs after the
  replay, outside the graph, so ``seed``, ``noise`` and torch's generator behave exactly as
  without graphs.
* Only without autograd (grad mode off, or nothing requiring grad), on CUDA, outside
  ``torch.compile`` and outside CUDA autocast; otherwise the call runs eagerly.

Graphs hold the addresses of the weights. Moving or casting the model (``.to()``, ``.half()``,
...) drops every graph (``VAE._apply``); changing weights in place (``load_state_dict``,
``copy_``) needs nothing, except the upsamplers' folded weights, which are refolded in place
before a replay when their source changed. Replacing a parameter object
(``module.weight = Parameter(...)``) is not seen: call ``sdvae.optimize`` again, which drops
the graphs. Copies of the model (``copy.deepcopy``, pickling) start without graphs and
capture their own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from . import _tf32

__all__ = ["GraphedCall", "graph_reasons"]


def graph_reasons(device: torch.device) -> list[str]:
    """Why CUDA graphs cannot be used for a model on ``device`` ([] when they can)."""
    if device.type != "cuda":
        return [f"the model is on {device.type}: CUDA graphs need a CUDA device"]
    if not torch.cuda.is_available():
        return ["torch.cuda is not available"]
    return []


def autocast_on() -> bool:
    """Whether CUDA autocast is on. Graphs are not used then: autocast's weight cache, which a
    capture would read, is freed when the autocast block ends (and the output dtype would
    depend on how the graph was captured)."""
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled()


def settings_key() -> tuple:
    """The switches a captured graph freezes (cuDNN / cuBLAS math and algorithm choice): a
    change of any of them gets its own graph. The TF32 switches are read through ``_tf32``
    (torch's per-operator API where it exists: the legacy getters can raise once a program has
    used it)."""
    return (
        _tf32.conv_allowed(),
        _tf32.matmul_allowed(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )


class GraphedCall:
    """``fn(x) -> tensor``, replayed from one captured CUDA graph per (shape, dtype, device,
    settings); at most ``max_graphs`` kept (least recently used dropped first), all sharing one
    memory pool.

    The input is copied into a dense static buffer in ``memory_format`` (the model's), so any
    input layout (expanded, sliced, NCHW or channels_last) takes the same graph. Sharing the
    pool is safe because replays run one after another on the caller's stream and each output
    is copied out before the next replay. ``before_replay`` (optional) runs on the host before
    each replay (e.g. refreshing derived weights in place)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        warmup: int = 2,
        before_replay: Callable[[], None] | None = None,
        memory_format: torch.memory_format | None = None,
        max_graphs: int = 8,
    ):
        self.fn = fn
        self.warmup = warmup
        self.before_replay = before_replay
        self.memory_format = memory_format or torch.contiguous_format
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._pools: dict = {}  # device -> graph pool handle

    def key(self, x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.device, settings_key())

    def clear(self) -> None:
        self.graphs.clear()
        self._pools.clear()

    def _capture(self, x: torch.Tensor):
        dev = x.device
        static_in = torch.empty(
            x.shape, dtype=x.dtype, device=dev, memory_format=self.memory_format
        )
        static_in.copy_(x)
        with torch.cuda.device(dev):
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            pool = self._pools.get(dev)
            if pool is None:
                pool = self._pools[dev] = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=dev)):
                static_out = self.fn(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Plain (not inference-mode) tensors throughout, so that static buffers made under
        # torch.inference_mode can still be written by a later call outside it.
        with torch.inference_mode(False), torch.no_grad():
            if self.before_replay is not None:
                self.before_replay()
            k = self.key(x)
            entry = self.graphs.get(k)
            if entry is None:
                while len(self.graphs) >= self.max_graphs:
                    self.graphs.popitem(last=False)
                entry = self._capture(x)
                self.graphs[k] = entry
            self.graphs.move_to_end(k)
            graph, static_in, static_out = entry
            with torch.cuda.device(x.device):
                static_in.copy_(x)
                graph.replay()
                return static_out.clone(memory_format=torch.preserve_format)
