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
* ``VAE.decode``: the whole decoder after the argument checks (unscaling, post_quant_conv,
  decoder).
* ``VAE.encode``: the encoder and quant_conv (``VAE.moments``). The sampling step runs after
  the replay, outside the graph, so ``seed``, ``noise`` and torch's generator behave exactly
  as without graphs.
* ``WanVAE.decode``: the whole chunked decode of ``post_quant_conv``'s output, every latent
  frame and the clamp (one graph per number of frames and frame size; ``post_quant_conv`` with
  the folded de-normalization runs before the replay). ``WanVAE.encode``: the chunked encoder
  and ``quant_conv``; the sampling and the normalization after the replay.
* Only without a memory budget (``max_memory``, ``offload``, ``band_rows``: the graphs' pool
  would hold memory the plan does not count), without autograd (grad mode off, or nothing
  requiring grad), on CUDA, outside ``torch.compile`` and outside CUDA autocast; otherwise
  the call runs eagerly.

Graphs hold the addresses of the weights. Before every call the addresses of the model's
parameters and buffers (the upsamplers' folded weights among them) are compared with those the
graphs were captured with, and any change drops every graph: moving or casting the model
(``.to()``, ``.half()``, ...), replacing a parameter object, a fold rebound to a new tensor.
Changing weights in place (``load_state_dict``, ``copy_``) needs nothing, except the
upsamplers' folded weights, which are refolded (in place) before a replay when their source
changed. Models with accelerate hooks (which swap weights per call) run without graphs, saying
why. Copies of the model (``copy.deepcopy``, pickling) start without graphs and capture their
own.

A capture that fails (an op that a capture forbids, e.g. a synchronizing copy) does not fail
the call: that signature runs eagerly from then on, and the reason is kept in
``GraphedCall.failures`` (and in ``vae.fused_reasons["cuda_graph"]`` for a model), with a
warning.

Threads: one lock per ``GraphedCall`` covers the lookup, the capture, the copy into the static
input, the replay and the copy out, and the next caller's stream waits for the previous
call's copy out (an event), so two threads never see each other's results. Captures use
``capture_error_mode="thread_local"``: another thread's offload copies or event waits during a
capture are not an error.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import _tf32, steps
from .dispatch import fold_is_current

__all__ = ["GraphedCall", "GraphedModel", "graph_reasons", "hook_reasons", "tensor_addresses"]


def graph_reasons(device: torch.device) -> list[str]:
    """Why CUDA graphs cannot be used for a model on ``device`` ([] when they can)."""
    if device.type != "cuda":
        return [f"the model is on {device.type}: CUDA graphs need a CUDA device"]
    if not torch.cuda.is_available():
        return ["torch.cuda is not available"]
    return []


def hook_reasons(module: torch.nn.Module) -> list[str]:
    """Why ``module`` cannot be replayed from CUDA graphs because of accelerate hooks ([] when
    it has none): a hook moves or swaps weights around each call, so a graph would read
    addresses that no longer hold them."""
    hooked = [name or "(the model)" for name, m in module.named_modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        return []
    more = f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
    return [
        f"accelerate hooks on {', '.join(hooked[:3])}{more}: they move weights per call, "
        "which a captured graph cannot follow"
    ]


def tensor_addresses(module: torch.nn.Module) -> tuple:
    """The addresses of ``module``'s parameters and buffers: what a graph captured from it
    reads. A change means a graph would read freed memory."""
    return tuple(t.data_ptr() for t in module.parameters()) + tuple(
        t.data_ptr() if t is not None else 0 for t in module.buffers()
    )


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
    pool is safe because calls hold a lock, replays are ordered one after another (the next
    caller's stream waits for the previous call's copy out) and each output is copied out
    before the next replay.

    ``prepare(x)`` (optional) runs on the host before each call, before any warm-up or
    capture: it refreshes derived weights in place and fills caches, so that nothing a graph
    reads is first made on the warm-up's side stream. ``addresses()`` (optional) returns what
    the graphs read by address; when it changes every graph is dropped. A signature whose
    capture failed runs ``fn`` eagerly from then on, its reason in ``failures`` (and passed to
    ``on_failure``)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        warmup: int = 2,
        prepare: Callable[[torch.Tensor], None] | None = None,
        addresses: Callable[[], tuple] | None = None,
        on_failure: Callable[[str], None] | None = None,
        memory_format: torch.memory_format | None = None,
        max_graphs: int = 8,
    ):
        self.fn = fn
        self.warmup = warmup
        self.prepare = prepare
        self.addresses = addresses
        self.on_failure = on_failure
        self.memory_format = memory_format or torch.contiguous_format
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        #: signature -> why its capture failed (that signature runs eagerly)
        self.failures: dict[tuple, str] = {}
        self._pools: dict = {}  # device -> graph pool handle
        self._captured_from: tuple | None = None  # addresses() when the graphs were captured
        self._done: dict = {}  # device -> event recorded after the last call's copy out
        self._lock = threading.Lock()

    def key(self, x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.device, settings_key())

    def clear(self) -> None:
        with self._lock:
            self.graphs.clear()
            self._pools.clear()
            self.failures.clear()

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
            with torch.cuda.graph(
                graph,
                pool=pool,
                stream=torch.cuda.Stream(device=dev),
                capture_error_mode="thread_local",
            ):
                static_out = self.fn(static_in)
        return graph, static_in, static_out

    def _replay(self, entry, x: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone(memory_format=torch.preserve_format)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Plain (not inference-mode) tensors throughout, so that static buffers made under
        # torch.inference_mode can still be written by a later call outside it.
        with torch.inference_mode(False), torch.no_grad(), self._lock:
            if self.prepare is not None:
                self.prepare(x)
            if self.addresses is not None:
                now = self.addresses()
                if now != self._captured_from:
                    self.graphs.clear()
                    self.failures.clear()
                    self._captured_from = now
            k = self.key(x)
            if k in self.failures:
                return self.fn(x)
            dev = x.device
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                self._after_previous(dev)
                entry = self.graphs.get(k)
                if entry is None:
                    while len(self.graphs) >= self.max_graphs:
                        self.graphs.popitem(last=False)
                    try:
                        entry = self._capture(x)
                    except Exception as exc:  # noqa: BLE001 - recorded, and the call runs
                        why = f"capture of {tuple(x.shape)} {x.dtype} failed: {exc}"
                        self.failures[k] = why
                        if self.on_failure is not None:
                            self.on_failure(why)
                        warnings.warn(f"sdvae: CUDA graph {why}; running eagerly", stacklevel=3)
                        return self.fn(x)
                    self.graphs[k] = entry
                self.graphs.move_to_end(k)
                out = self._replay(entry, x)
                self._mark_done(dev)
                return out

    def _after_previous(self, dev: torch.device) -> None:
        """Order this call's stream after the previous call's copy out (which may have run on
        another thread's stream): the static input is overwritten next."""
        done = self._done.get(dev)
        if done is not None:
            torch.cuda.current_stream(dev).wait_event(done)

    def _mark_done(self, dev: torch.device) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))
        self._done[dev] = ev


class GraphedModel:
    """The CUDA-graph switch of a model family (``sdvae.VAE``, ``sdvae.WanVAE``; mixed into
    the ``nn.Module``). The family names what may be graphed (``graph_functions``: name ->
    ``fn(x)``) and the folded weights to keep current before a replay (``graph_folds``:
    (owner, conv) pairs whose ``owner.fold()`` refolds in place); ``graph_runner(name, x)``
    says whether this call replays, and returns the runner. Moving or casting the model drops
    its graphs; a copy (deepcopy, pickle) keeps the switch and captures its own."""

    def graph_functions(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def graph_folds(self) -> list:
        return []

    def enable_cuda_graphs(self) -> None:
        """Replay the family's ``graph_functions`` from CUDA graphs, one per input shape;
        ``sdvae.optimize(vae, cuda_graph=True)`` calls this. Graphs captured before are
        dropped (with their memory pool), and the host view is walked afresh (a submodule
        moved on its own, e.g. by ``sdvae.optimize``'s layout change, bumps no generation)."""
        self.__dict__["graph_runners"] = {}
        self.__dict__.pop("_graph_cache", None)

    def disable_cuda_graphs(self) -> None:
        self.__dict__["graph_runners"] = None
        self.__dict__.pop("_graph_cache", None)

    @property
    def cuda_graphs(self) -> bool:
        return self.__dict__.get("graph_runners") is not None

    def _graph_failed(self, why: str) -> None:
        reasons = self.__dict__.setdefault("fused_reasons", {}).setdefault("cuda_graph", [])
        if why not in reasons:
            reasons.append(why)

    def _graph_view(self) -> tuple:
        """What a graphed call checks on the host, walked once per structural change
        (``sdvae.steps.generation``; moves and casts bump it too, see ``_apply``) instead of
        per call: (generation, every submodule, the folds, the weights' addresses). The model
        itself is left out of the list, so that it holds no cycle to itself."""
        now = steps.generation()
        view = self.__dict__.get("_graph_cache")
        if view is None or view[0] != now:
            mods = [m for m in self.modules() if m is not self]
            view = (now, mods, self.graph_folds(), tensor_addresses(self))
            self.__dict__["_graph_cache"] = view
        return view

    def graph_prepare(self, name: str, x: torch.Tensor) -> None:
        """Before a graphed call: refold, in place, what changed since (a fold made inside
        the capture would live in the graph's pool)."""
        for owner, conv in self._graph_view()[2]:
            if owner.fused and not fold_is_current(owner, conv):
                owner.fold()

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting reallocates every weight: captured graphs would read freed memory.
        if self.__dict__.get("graph_runners"):
            self.__dict__["graph_runners"] = {}
        out = super()._apply(fn, *args, **kwargs)
        steps.changed()  # addresses changed without a registration (``param.data = ...``)
        return out

    def __getstate__(self):
        # Captured graphs belong to this model's memory: a copy (deepcopy, pickle) keeps the
        # switch and captures its own.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        if state.get("graph_runners"):
            state["graph_runners"] = {}
        state.pop("_graph_cache", None)
        return state

    def graph_runner(self, name: str, x: torch.Tensor) -> GraphedCall | None:
        """The runner that replays ``graph_functions()[name]`` for this call, or None when it
        runs eagerly: graphs off, not CUDA, under ``torch.compile`` or CUDA autocast, under
        autograd (grad mode on and anything requiring grad), or accelerate hooks added after
        ``sdvae.optimize`` (then the graphs are dropped, the reason recorded)."""
        runners = self.__dict__.get("graph_runners")
        if runners is None or not x.is_cuda or torch.compiler.is_compiling() or autocast_on():
            return None
        mods = self._graph_view()[1]
        if "_hf_hook" in self.__dict__ or any("_hf_hook" in m.__dict__ for m in mods):
            self.__dict__["graph_runners"] = {}
            self.__dict__.setdefault("fused_reasons", {})["cuda_graph"] = hook_reasons(self)
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return None
        runner = runners.get(name)
        if runner is None:
            runner = runners[name] = GraphedCall(
                self.graph_functions()[name],
                prepare=lambda x, name=name: self.graph_prepare(name, x),
                addresses=lambda: self._graph_view()[3],
                on_failure=self._graph_failed,
                memory_format=self.memory_format,
            )
        return runner
