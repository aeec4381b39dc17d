"""CUDA graphs for a ``VAE``'s encoder and decoder: ``sdvae.optimize(vae, cuda_graph=True)``.

A decode of a 512² image is a few hundred kernel launches of a few microseconds each: the
launches, not the GPU, set its time. A CUDA graph records them once and replays them with one
launch. ``GraphedCall`` keeps one graph per input signature (shape, strides, dtype, device):
the first call with a new signature warms the function up on a side stream (cuDNN's algorithm
choice, Triton's compile and autotune, the attention backend's one-time measurement happen
there), then captures it; every later call copies the input into the graph's static input,
replays, and returns a copy of the static output (so a result is never overwritten by the
next call).

What is graphed, and what is not:
* ``decode``: the whole decoder after the argument checks (unscaling, post_quant_conv,
  decoder).
* ``encode``: the encoder and quant_conv (``VAE.moments``). The sampling step runs after the
  replay, outside the graph, so ``seed``, ``noise`` and torch's generator behave exactly as
  without graphs.
* Only without autograd (grad mode off, or nothing requiring grad), on CUDA, outside
  ``torch.compile``; otherwise the call runs eagerly.

Graphs hold the addresses of the weights. Moving or casting the model (``.to()``, ``.half()``,
...) drops every graph (``VAE._apply``); changing weights in place (``load_state_dict``,
``copy_``) needs nothing, except the upsamplers' folded weights, which are refolded in place
before a replay when their source changed. Replacing a parameter object
(``module.weight = Parameter(...)``) is not seen: call ``sdvae.optimize`` again, which drops
the graphs. Each graph keeps its own memory pool (one per input shape).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedCall", "graph_reasons"]


def graph_reasons(device: torch.device) -> list[str]:
    """Why CUDA graphs cannot be used for a model on ``device`` ([] when they can)."""
    if device.type != "cuda":
        return [f"the model is on {device.type}: CUDA graphs need a CUDA device"]
    if not torch.cuda.is_available():
        return ["torch.cuda is not available"]
    return []


class GraphedCall:
    """``fn(x) -> tensor``, replayed from one captured CUDA graph per input signature.

    ``before_replay`` (optional) runs on the host before each replay (e.g. refreshing derived
    weights in place)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        warmup: int = 2,
        before_replay: Callable[[], None] | None = None,
    ):
        self.fn = fn
        self.warmup = warmup
        self.before_replay = before_replay
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device)

    def clear(self) -> None:
        self.graphs.clear()

    def _capture(self, x: torch.Tensor):
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        torch.cuda.synchronize(x.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
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
                entry = self._capture(x)
                self.graphs[k] = entry
            graph, static_in, static_out = entry
            static_in.copy_(x)
            graph.replay()
            return static_out.clone(memory_format=torch.preserve_format)
