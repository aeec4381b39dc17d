"""Memory budgets for encode and decode: ``max_memory`` / ``offload``, the planner, and the
entry points ``VAE.encode/decode/memory_plan`` and the diffusers patch call.

A budget counts what one call allocates on the device beyond the weights and its input, the
output included (as the bench's ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` minus
what was allocated before the call).

* Today's (full) path: its peak is estimated layer by layer (``full_peak``) from what each
  block of the model holds at once in the code that runs it -- sdvae's fused path (in-place
  GroupNorms, the folded upsampler), sdvae's eager path, stock or patched diffusers.
* The streamed path (``sdvae.stream``): for each pass the stored tensors live during it
  (known exactly) plus the most one band of its rows allocates, measured by running the
  engine's own band code on the meta device (``stream.pass_cost``); band heights are the
  largest that fit the budget, pass by pass.
* On CUDA ``CUDA_RESERVE`` is kept for library workspaces (cuDNN, cuBLAS), which no tensor
  shows: a budgeted call runs with sdvae's convs' cuDNN workspace capped at
  ``CONV_WORKSPACE`` and cuDNN's benchmark mode off for ATen's convolutions (``budgeted``).

``plan`` picks the full path when its estimate fits, else the streamed path; a budget below
the streamed path's smallest bands raises ``ValueError`` naming the smallest budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import threading

import torch

from . import dispatch, execute, steps, stream

__all__ = [
    "BudgetError",
    "budget_error",
    "largest_rows",
    "MemoryPlan",
    "PassPlan",
    "StoredTensor",
    "parse_memory",
    "format_bytes",
    "free_memory",
    "host_memory_available",
    "full_peak",
    "plan_part",
    "vae_plan",
    "decode",
    "moments",
    "diffusers_plan",
    "diffusers_decode",
    "diffusers_moments",
    "budgeted",
    "OFFLOADS",
    "CONV_WORKSPACE",
    "ATEN_CONV_WORKSPACE",
    "CUBLAS_WORKSPACE",
    "CUDA_RESERVE",
]

OFFLOADS = (None, "cpu")
#: cuDNN workspace cap of sdvae's convs (``sdvae.ops``) inside a call with a budget
#: (``ops.workspace_limit``; otherwise ``SDVAE_CONV_WORKSPACE_LIMIT``, default 1 GiB).
CONV_WORKSPACE = 320 * 2**20
#: ATen's transposed conv (the folded upsampler; its cuDNN engine and workspace are ATen's
#: choice, which sdvae cannot cap) and ATen's other convolutions (eager models): an allowance,
#: with ``torch.backends.cudnn.benchmark`` off inside the call (benchmark mode tries engines
#: with workspaces up to the allocator's largest free block). Measured on the GPU against
#: the streamed band shapes (tests/test_stream.py).
ATEN_CONV_WORKSPACE = 320 * 2**20
#: cuBLAS / cuBLASLt workspaces (the attention's projections), allocated once per handle and
#: stream and kept.
CUBLAS_WORKSPACE = 64 * 2**20
#: Device memory kept free on CUDA for library workspaces, which no tensor shows: one conv's
#: workspace at a time (they are freed after each call) plus cuBLAS's. The attention library
#: path's score chunks are counted with the band that runs them.
CUDA_RESERVE = max(CONV_WORKSPACE, ATEN_CONV_WORKSPACE) + CUBLAS_WORKSPACE
#: Small allocations that do not scale with the image (kernel scratch), beside the GroupNorm
#: statistics the streamed path keeps (counted per plan).
FIXED_RESERVE = 32 * 2**10

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value, name: str = "max_memory") -> int | None:
    """Bytes from an int or a string such as ``"6GiB"``, ``"512 MiB"``, ``"12GB"`` (decimal
    kB/MB/GB/TB, binary KiB/MiB/GiB/TiB); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '6GiB', got a bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"{name} must be a positive number of bytes, got {value}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a number of bytes or a string like '6GiB', got {type(value).__name__}"
        )
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{name}={value!r}: give bytes or a size such as '6GiB', '512MiB' or '12GB'"
        )
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def free_memory(device) -> int:
    """Bytes a call can still allocate on ``device``: CUDA's free memory plus what torch's
    caching allocator holds unused; on the CPU the available physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2**62


def records_grad(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether autograd would record a call of ``module`` on ``x``: grad mode on and ``x`` or
    one of the module's weights requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in module.parameters())
    )


def refuse_grad(x: torch.Tensor, module: torch.nn.Module) -> None:
    """A call with a budget (``max_memory`` / ``offload``) is an inference call, whichever
    path its plan picks: the streamed one writes its bands in place, and the full one under
    autograd keeps every activation for the backward pass, far past the budget. ValueError,
    before any work, when autograd would record it."""
    if records_grad(x, module):
        raise ValueError(
            "max_memory / offload make this an inference call, but autograd would record it "
            "(grad mode is on and the input or the model's weights require grad): call it "
            "under torch.no_grad() or torch.inference_mode() (or freeze the weights with "
            "requires_grad_(False))"
        )


def host_memory_available() -> int | None:
    """Bytes of host memory available now: ``MemAvailable`` of /proc/meminfo (Linux: free
    memory plus what the kernel can reclaim), else the free physical pages; None when the
    system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def check_offload(offload) -> str | None:
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
    return offload


# ------------------------------------------------------------------ today's path
def full_peak(part, shape, dtype: torch.dtype, device, fmt=None) -> int:
    """Estimated peak bytes of ``part``'s own full forward on an input of ``shape`` in layout
    ``fmt`` (default: the part's, ``stream.memory_format_of``) on ``device``: the input
    excluded, the output included.

    sdvae's own paths are measured, not fitted: their own code runs on the meta device, with
    what the fused ops hold inside themselves counted (``sdvae.dispatch.metered``): the
    whole-tensor executor on the part's meta step records (``execute.measure``), or the eager
    modules' forwards with meta parameters (``torch.func.functional_call``). A diffusers
    part runs diffusers' own forwards (with the patch's leaves when patched), which are not
    ours: for them the counts below, per block, in units of the block's tensors, upper bounds
    of what ``sdvae.memtrack`` measured on the CPU for each (tests/test_stream.py)."""
    device = torch.device(device)
    low = steps.lower(part, dtype, meta=True, banded=False)
    if low.kind == "encoder":  # a level with no rows left: refused, naming the images
        downs = sum(isinstance(st, steps.Downsample) for st in low.steps)
        stream.check_encoder_input(*shape[2:], downs)
    if fmt is None:
        fmt = stream.memory_format_of(part, torch.empty(shape, device="meta"))
    if low.flavor == "fused":
        return execute.measure(low, tuple(shape), dtype, fmt, device)
    if low.flavor == "sdvae":
        return _measure_modules(part, shape, dtype, fmt, device)
    return _diffusers_peak(low, shape, dtype, device)


def _measure_modules(part, shape, dtype, fmt, device) -> int:
    """Peak bytes of ``part``'s own (eager) forward, run on the meta device with meta twins of
    its parameters and buffers."""
    from .memtrack import TensorMemory

    def twin(t):
        return torch.empty_like(t, device="meta", dtype=dtype if t.is_floating_point() else None)

    state = {n: twin(t) for n, t in part.named_parameters()}
    state.update({n: twin(t) for n, t in part.named_buffers() if t is not None})
    x = torch.empty(tuple(shape), dtype=dtype, device="meta", memory_format=fmt)
    with torch.no_grad(), TensorMemory("meta", collect=False) as tracker:
        with dispatch.metered(tracker, device):
            torch.func.functional_call(part, state, (x,))
    return tracker.peak


def _diffusers_peak(low, shape, dtype: torch.dtype, device) -> int:
    """``full_peak`` of a diffusers part: stock (``low.flavor == "stock"``) or patched."""
    flavor = low.flavor
    on_cpu = device.type == "cpu"
    n, _, h, w = shape
    e = torch.empty((), dtype=dtype).element_size()

    def size(c, hh, ww):
        return n * c * hh * ww * e

    def conv_extra(conv, out):  # sdvae's C++ CPU conv copies its output once
        return out if (on_cpu and conv.fused) else 0

    peak, cur, held, level_in, box = 0, 0, 0, 0, None
    for st in low.steps:
        # A level or mid block called as a module keeps its input (nn.Module's call holds
        # the arguments) while its later blocks run.
        container = re.split(r"\.(?:resnets|attentions|upsamplers|downsamplers)\.", st.name)[0]
        if container != box:
            box, held, level_in = container, 0, cur
        else:
            held = level_in
        if isinstance(st, steps.ConvIn):
            out = size(st.cout, h, w)
            cost, cur = out + conv_extra(st.conv, out), out
        elif isinstance(st, steps.Resnet):
            x, o = size(st.cin, h, w), size(st.cout, h, w)
            if st.shortcut is not None:
                cost = {
                    "stock": max(3 * x, 2 * x + o, 2 * x + 2 * o, x + 4 * o),
                    "patched": max(2 * x + o, x + 3 * o),
                }[flavor]
            else:
                cost = {"stock": 4 * o, "patched": 3 * o}[flavor]
            cost, cur = cost + conv_extra(st.conv1, o), o
        elif isinstance(st, steps.Attention):
            c = size(st.channels, h, w)
            cost = {"stock": 11 * c, "patched": 14 * c}[flavor]
            if st.fused:  # the kernel's logsumexp
                cost += n * st.heads * h * w * 4
            else:  # SDPA's own buffers
                q_shape = (n, st.heads, h * w, st.channels // st.heads)
                cost += dispatch.sdpa_extra_bytes(device, q_shape, h * w, dtype)
            if flavor == "patched":  # the q/k/v weights concatenated per call
                cost += 3 * st.channels * (st.channels + 1) * e
            if st.fused and not on_cpu:
                cost += c + 2 * 2**24 * 4  # the attention library path's q copy and scores
        elif isinstance(st, steps.Upsample):
            o = 4 * cur
            cost = cur + o if st.folded is not None else cur + 2 * o
            cur, h, w = o, 2 * h, 2 * w
        elif isinstance(st, steps.Downsample):
            h2, w2 = h // 2, w // 2
            o = size(st.channels, h2, w2)
            if st.conv.fused:
                cost = cur + o + conv_extra(st.conv, o)
            else:  # F.pad's padded copy
                cost = cur + size(st.channels, h + 1, w + 1) + o
            cur, h, w = o, h2, w2
        else:
            img = size(st.cout, h, w)
            cost = max(2 * cur, cur + img) + conv_extra(st.conv, img)
        peak = max(peak, cost + held)
    return int(peak)


# ------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class PassPlan:
    """One pass of the streamed path: bands of ``rows`` output rows over ``height``."""

    name: str
    kind: str
    height: int
    width: int
    rows: int
    bands: int
    stored_bytes: int  # stored tensors on the device during this pass
    band_bytes: int  # the most one band allocates

    @property
    def peak(self) -> int:
        return self.stored_bytes + self.band_bytes


@dataclasses.dataclass
class StoredTensor:
    name: str
    shape: tuple[int, int, int, int]
    nbytes: int
    where: str  # "device" or "host"
    passes: tuple[int, int]  # the first and last pass that use it


@dataclasses.dataclass
class MemoryPlan:
    """What ``encode``/``decode`` do for an input shape within a budget.

    ``path``: ``"full"`` (today's path: no budget, or its estimate fits) or ``"streamed"``.
    ``full_bytes`` / ``streamed_bytes``: estimated peaks (bytes the call allocates beyond the
    weights and its input) of the full path and of the streamed path with the chosen bands;
    ``min_bytes``: the smallest budget the streamed path meets (one-row bands). ``passes``
    and ``stored``: the streamed path's passes (band heights, bytes) and stored tensors."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    offload: str | None
    budget: int | None
    path: str
    full_bytes: int
    streamed_bytes: int
    min_bytes: int
    passes: list[PassPlan]
    stored: list[StoredTensor]
    #: ``offload="cpu"``: host memory the stored tensors take (on CUDA the pinned blocks
    #: torch's host allocator makes for them, see ``_host_bytes``), and what was available
    host_bytes: int = 0
    host_available: int | None = None
    #: the Wan family's banded decode: the up blocks before ``split`` run whole, the rest is
    #: banded (``sdvae.wan_stream``)
    split: int = 0

    @property
    def host_short(self) -> bool:
        """Whether the streamed path's offloaded tensors need more host memory than is
        available."""
        return (
            self.offload == "cpu"
            and self.host_available is not None
            and self.host_bytes > self.host_available
        )

    @property
    def estimate(self) -> int:
        """The estimated peak of the path that runs."""
        return self.full_bytes if self.path == "full" else self.streamed_bytes

    @property
    def rows(self) -> list[int]:
        return [p.rows for p in self.passes]

    def describe(self) -> str:
        head = (
            f"{self.op} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')} on "
            f"{self.device}, offload={self.offload}, budget "
            f"{format_bytes(self.budget) if self.budget else 'none'}: {self.path} path; "
            f"full ~{format_bytes(self.full_bytes)}, streamed ~"
            f"{format_bytes(self.streamed_bytes)}, smallest budget {format_bytes(self.min_bytes)}"
        )
        if self.offload == "cpu":
            avail = "?" if self.host_available is None else format_bytes(self.host_available)
            head += f"; host memory {format_bytes(self.host_bytes)} of {avail} available"
        lines = [head]
        for i, p in enumerate(self.passes):
            lines.append(
                f"  {i:3d} {p.name:34s} {p.height:6d}x{p.width:<6d} rows {p.rows:5d} "
                f"({p.bands} bands) stored {format_bytes(p.stored_bytes)} + band "
                f"{format_bytes(p.band_bytes)}"
            )
        return "\n".join(lines)


#: ``budgeted`` calls running now, in any thread, and the benchmark setting before the first
_BENCH_LOCK = threading.Lock()
_BENCH_STATE = {"calls": 0, "saved": False}


@contextlib.contextmanager
def budgeted():
    """What a call with a budget runs under, whichever path: sdvae's convs' cuDNN workspace
    capped at ``CONV_WORKSPACE`` (this thread; within ``CUDA_RESERVE``) and
    ``torch.backends.cudnn.benchmark`` off (process-wide; benchmark mode tries engines with
    workspaces up to the allocator's largest free block). The switch is one for the process,
    so overlapping calls in several threads share it: the first saves the user's setting, the
    last to end restores it (a call restoring its own saved value would turn benchmark mode
    back on under another thread's budgeted call, or leave it off for good). Nothing else
    changes on the CPU, where neither is used."""
    from . import ops

    with _BENCH_LOCK:
        if _BENCH_STATE["calls"] == 0:
            _BENCH_STATE["saved"] = torch.backends.cudnn.benchmark
        _BENCH_STATE["calls"] += 1
        torch.backends.cudnn.benchmark = False
    try:
        with ops.workspace_limit(CONV_WORKSPACE):
            yield
    finally:
        with _BENCH_LOCK:
            _BENCH_STATE["calls"] -= 1
            if _BENCH_STATE["calls"] == 0:
                torch.backends.cudnn.benchmark = _BENCH_STATE["saved"]


def _reserve(device: torch.device) -> int:
    return FIXED_RESERVE + (CUDA_RESERVE if device.type == "cuda" else 0)


def _stored_bytes(prog, i: int, offload: bool) -> int:
    total = 0
    for b in prog.bufs:
        if b.first <= i <= b.last and (b.device_only or not offload):
            total += prog.n * b.c * b.h * b.w * prog.elem
    return total


def _host_bytes(prog, device: torch.device) -> int:
    """Host memory the offloaded stored tensors take. On CUDA they are pinned through torch's
    caching host allocator, which rounds each request up to a power of two, reuses a freed
    block only for a request of the same rounded size and keeps every block it made until
    the run ends (the stream then hands them back): the bytes of the blocks the run's
    allocations make, in the order the runner makes and frees them. On the CPU: the most
    bytes held at once."""
    pinned = device.type == "cuda"
    free: dict[int, int] = {}
    held = live = most = 0

    def size(b) -> int:
        return prog.n * b.c * b.h * b.w * prog.elem

    for i in range(len(prog.passes)):
        for b in prog.bufs:
            if b.device_only or b.first != i:
                continue
            live += size(b)
            most = max(most, live)
            block = 1 << (size(b) - 1).bit_length()
            if free.get(block):
                free[block] -= 1
            else:
                held += block
        for b in prog.bufs:
            if not b.device_only and b.last == i:
                live -= size(b)
                block = 1 << (size(b) - 1).bit_length()
                free[block] = free.get(block, 0) + 1
    return held if pinned else most


def largest_rows(cost, height: int, avail: int, c1: int) -> int:
    """The largest band height whose cost fits ``avail``, given ``cost(rows)`` (about affine
    in rows) and ``c1 = cost(1) <= avail``: secant steps, each checked by ``cost``."""
    lo, lo_c = 1, c1
    top = cost(height)
    if top <= avail:
        return height
    hi, hi_c = height, top
    while hi - lo > 1:
        guess = lo + int((avail - lo_c) * (hi - lo) / max(hi_c - lo_c, 1))
        guess = min(max(guess, lo + 1), hi - 1)
        c = cost(guess)
        if c <= avail:
            lo, lo_c = guess, c
            if hi - lo <= max(1, lo // 16):  # within ~6%: good enough, saves meta runs
                break
        else:
            hi, hi_c = guess, c
    return lo


def plan_part(part, shape, *, dtype, device, fmt, budget: int | None, offload: str | None,
              full_bytes: int, outside_bytes: int = 0, op: str | None = None,
              band_rows=None) -> MemoryPlan:  # fmt: skip
    """The plan of running ``part`` (an sdvae or diffusers Encoder/Decoder) on an input of
    ``shape`` within ``budget`` bytes (None: no budget). ``full_bytes``: the full path's
    estimate; ``outside_bytes``: what the caller holds beside the part during the run.
    ``band_rows`` forces the streamed path with those band heights (an int, or a sequence
    used in turn; tests)."""
    device = torch.device(device)
    prog = stream.program(part, tuple(shape), dtype, meta=True)
    off = offload == "cpu"
    kw = dict(dtype=dtype, fmt=fmt, offload=off, real=device.type)
    acc = 8 if dtype == torch.float64 else 4
    reserve = _reserve(device) + outside_bytes + sum(3 * prog.n * s.groups * acc
                                                     for s in prog.slots)  # fmt: skip
    reserve += stream.hooked_weight_bytes(part, device, dtype)
    out_bytes = prog.n * prog.out_c * prog.out_hw[0] * prog.out_hw[1] * prog.elem
    passes, smallest, chosen, fits = [], 0, 0, True
    for i, p in enumerate(prog.passes):
        stored = _stored_bytes(prog, i, off) + (out_bytes if p.kind == "out" else 0)
        c1 = stream.pass_cost(prog, i, 1, **kw)
        smallest = max(smallest, stored + c1)
        if band_rows is not None:
            rows = band_rows
            height = max(b - a for a, b in stream.band_list(p.h, band_rows))
            band = stream.pass_cost(prog, i, height, **kw) if isinstance(rows, int) else c1
        else:
            avail = (budget if budget is not None else 2**62) - reserve - stored
            if c1 > avail:
                fits, rows, band = False, 1, c1
            else:
                rows = largest_rows(lambda r, i=i: stream.pass_cost(prog, i, r, **kw), p.h,
                                     avail, c1)  # fmt: skip
                band = stream.pass_cost(prog, i, rows, **kw)
        if not isinstance(rows, int):  # a sequence of band heights: its costliest band
            band = max(stream.pass_cost(prog, i, r, **kw) for r in set(rows))
        chosen = max(chosen, stored + band)
        bands = len(stream.band_list(p.h, rows))
        passes.append(PassPlan(p.name, p.kind, p.h, p.w, rows if isinstance(rows, int) else
                               max(rows), bands, stored, band))  # fmt: skip
    min_bytes, streamed = smallest + reserve, chosen + reserve
    if band_rows is not None:
        path = "streamed"
    elif budget is None or full_bytes <= budget:
        path = "full"
    elif fits and streamed <= budget:
        path = "streamed"
    else:
        path = "none"
    host, host_available = 0, None
    if off:
        host, host_available = _host_bytes(prog, device), host_memory_available()
        if path == "streamed" and host_available is not None and host > host_available:
            path = "none"
    stored = [
        StoredTensor(
            b.name,
            (prog.n, b.c, b.h, b.w),
            prog.n * b.c * b.h * b.w * prog.elem,
            "device" if (b.device_only or not off) else "host",
            (b.first, b.last),
        )
        for b in prog.bufs
    ]
    return MemoryPlan(op or prog.kind, tuple(shape), dtype, device, offload, budget, path,
                      int(full_bytes), int(streamed), int(min_bytes), passes, stored,
                      host, host_available)  # fmt: skip


class BudgetError(ValueError):
    """A memory budget that no path can meet (the message names the smallest that works)."""


def budget_error(plan: MemoryPlan, name: str = "max_memory") -> BudgetError:
    """The error for a plan no path meets (``plan.path == "none"``), naming the smallest
    budget that works, or the host memory offload lacks; ``name``: the option's name."""
    what = f"{plan.op} shape {tuple(plan.shape)} in {str(plan.dtype).replace('torch.', '')}"
    if plan.host_short:
        pinned = " (pinned: each tensor rounded up to a power of two)"
        return BudgetError(
            f"offload='cpu' keeps {format_bytes(plan.host_bytes)} of stored activations in host "
            f"memory to {what}{pinned if plan.device.type == 'cuda' else ''}, but only "
            f"{format_bytes(plan.host_available)} is available: free host memory, or give a "
            f"{name} that the streamed path meets without offload"
        )
    return BudgetError(
        f"{name}={format_bytes(plan.budget)} is too small to {what} with "
        f"offload={plan.offload!r}: the smallest budget that works is "
        f"{format_bytes(plan.min_bytes)} ({plan.min_bytes} bytes)"
        + ("" if plan.offload else "; offload='cpu' needs less")
    )


# --------------------------------------------------------------------- sdvae.VAE
def _vae_fmt(vae) -> torch.memory_format:
    return vae.memory_format or torch.contiguous_format


def vae_plan(vae, op: str, shape, *, dtype=None, device=None, max_memory=None, offload=None,
             band_rows=None, raw: bool = False) -> MemoryPlan:  # fmt: skip
    """``VAE.memory_plan``: the plan of ``vae.decode`` (``op="decode"``, ``shape`` of the
    latents: FLUX.2's pipeline latents, 2x2 patches, unless ``raw``) or ``vae.encode``
    (``op="encode"``, ``shape`` of the images)."""
    if op not in ("decode", "encode"):
        raise ValueError(f"op must be 'decode' or 'encode', got {op!r}")
    p = next(vae.parameters())
    dtype = p.dtype if dtype is None else dtype
    device = p.device if device is None else torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    shape = tuple(int(s) for s in shape)
    cfg = vae.config
    patched = op == "decode" and cfg.is_flux2 and not raw
    if op == "decode":
        want = cfg.pipeline_latent_channels if patched else cfg.latent_channels
    else:
        want = cfg.in_channels
    if len(shape) != 4 or shape[1] != want or min(shape) < 1:
        raise ValueError(
            f"shape must be (N, {want}, H, W) for {op} with positive sizes, got {shape}"
        )
    budget = parse_memory(max_memory)
    offload = check_offload(offload)
    e = torch.empty((), dtype=dtype).element_size()
    n, c, h, w = shape
    fmt = _vae_fmt(vae)
    if op == "decode":
        lat = n * c * h * w * e
        part = vae.decoder
        # the latents' layout copy, the scaled latents and the post-quant conv's output (FLUX.2:
        # the folded conv's output, its unpatchified copy and that copy's layout copy: as many
        # bytes each); the decoder reads the raw latents
        outside, before = 2 * lat, 3 * lat
        if patched:
            p = cfg.patch_size
            shape_in = (n, cfg.latent_channels, h * p, w * p)
        else:
            shape_in = shape
        full = before + full_peak(part, shape_in, dtype, device) + _reserve(device)
    else:
        img = n * c * h * w * e if vae.memory_format is not None else 0
        part = vae.encoder
        f = cfg.downsample_factor
        mom = n * 2 * cfg.latent_channels * math.ceil(h / f) * math.ceil(w / f) * e
        outside = img
        after = img + 2 * mom + 3 * mom  # moments, quant conv, sampling's temporaries
        full = max(img + full_peak(part, shape, dtype, device) + mom, after) + _reserve(device)
        shape_in = shape
    result = plan_part(part, shape_in, dtype=dtype, device=device, fmt=fmt, budget=budget,
                       offload=offload, full_bytes=full, outside_bytes=outside, op=op,
                       band_rows=band_rows)  # fmt: skip
    if op == "encode":
        result.streamed_bytes = max(result.streamed_bytes, after + _reserve(device))
        result.min_bytes = max(result.min_bytes, after + _reserve(device))
        if result.path == "streamed" and budget is not None and result.streamed_bytes > budget:
            result.path = "none"
    return result


def _budget_for(device, max_memory, offload):
    budget = parse_memory(max_memory)
    if budget is None:  # offload alone: whatever the device has free
        budget = free_memory(device)
    return budget


def _vae_call(vae, op: str, x: torch.Tensor, max_memory, offload, band_rows, raw=False):
    """``VAE.decode`` (``op="decode"``) or ``VAE.moments`` with a budget (input checked):
    the usual path when it fits, else the streamed one; ``BudgetError`` when nothing fits."""
    offload = check_offload(offload)
    parse_memory(max_memory)
    refuse_grad(x, vae)
    budget = _budget_for(x.device, max_memory, offload) if band_rows is None else None
    plan = vae_plan(vae, op, x.shape, dtype=x.dtype, device=x.device, max_memory=budget,
                    offload=offload, band_rows=band_rows, raw=raw)  # fmt: skip
    if plan.path == "none":
        raise budget_error(plan)
    decoding = op == "decode"
    with budgeted():
        if plan.path == "full":
            # The whole-tensor path, never its CUDA graphs: their pool, static buffers and
            # warm-ups are not in full_bytes, and a capture empties the caches process-wide.
            if not decoding:
                return vae.run_encoder(x)
            return vae.run_decoder(x, raw=raw)
        rows = plan.rows if band_rows is None else band_rows
        part = vae.decoder if decoding else vae.encoder

        def streamed(t):
            return stream.run(part, t, rows=rows, offload=offload)

        if not decoding:
            return vae.run_encoder(x, encoder=streamed)
        return vae.run_decoder(x, streamed, raw=raw)


def decode(vae, latents: torch.Tensor, *, max_memory=None, offload=None, band_rows=None,
           raw: bool = False):  # fmt: skip
    """``VAE.decode(latents, max_memory=..., offload=..., raw=...)`` (latents already
    checked); ``band_rows`` forces the streamed path with those band heights (tests)."""
    return _vae_call(vae, "decode", latents, max_memory, offload, band_rows, raw)


def moments(vae, images: torch.Tensor, *, max_memory=None, offload=None, band_rows=None):
    """``VAE.moments(images, max_memory=..., offload=...)`` (images already checked)."""
    return _vae_call(vae, "encode", images, max_memory, offload, band_rows)


# ------------------------------------------------------------------------ diffusers
def _akl_budget(akl, device):
    budget = parse_memory(getattr(akl, "sdvae_max_memory", None), "sdvae_max_memory")
    return free_memory(device) if budget is None else budget


def diffusers_plan(akl, op: str, x: torch.Tensor, *, max_memory=None, offload=None,
                   band_rows=None) -> MemoryPlan:  # fmt: skip
    """The plan of a patched ``AutoencoderKL``'s tiled ``op`` (``"decode"``: the decoder and
    post-quant conv on latents ``x``; ``"encode"``: the encoder on images ``x``, only their
    shape, dtype, device and layout are read) within ``max_memory`` (None: no budget)."""
    if op not in ("decode", "encode"):
        raise ValueError(f"op must be 'decode' or 'encode', got {op!r}")
    budget, offload = parse_memory(max_memory), check_offload(offload)
    part = akl.decoder if op == "decode" else akl.encoder
    outside = x.numel() * x.element_size() if op == "decode" else 0  # the post-quant conv's
    full = outside + full_peak(part, x.shape, x.dtype, x.device) + _reserve(x.device)
    return plan_part(part, x.shape, dtype=x.dtype, device=x.device,
                     fmt=stream.memory_format_of(part, x), budget=budget, offload=offload,
                     full_bytes=full, outside_bytes=outside, op=op,
                     band_rows=band_rows)  # fmt: skip


def _akl_call(akl, op: str, x: torch.Tensor, band_rows, pre=None, post=None):
    """A patched ``AutoencoderKL``'s ``op`` part on ``x`` with tiling on: ``pre`` (the
    post-quant conv), the part, full when the plan fits the budget (``akl.sdvae_max_memory``,
    else the free memory) or else streamed (``akl.sdvae_offload``), then ``post`` (the quant
    conv)."""
    offload = check_offload(getattr(akl, "sdvae_offload", None))
    refuse_grad(x, akl)
    budget = _akl_budget(akl, x.device) if band_rows is None else None
    plan = diffusers_plan(akl, op, x, max_memory=budget, offload=offload, band_rows=band_rows)
    if plan.path == "none":
        raise budget_error(plan, "sdvae_max_memory")
    part = akl.decoder if op == "decode" else akl.encoder
    with budgeted():
        if pre is not None:
            x = pre(x)
        if plan.path == "full":
            y = part(x)
        else:
            rows = plan.rows if band_rows is None else band_rows
            y = stream.run(part, x, rows=rows, offload=offload)
        return post(y) if post is not None else y


def diffusers_decode(akl, z: torch.Tensor, *, band_rows=None) -> torch.Tensor:
    """A patched ``AutoencoderKL``'s decode with tiling on: exactly the untiled decode, run
    full when it fits the budget, else streamed (``_akl_call``)."""
    return _akl_call(akl, "decode", z, band_rows, pre=akl.post_quant_conv)


def diffusers_moments(akl, x: torch.Tensor, *, band_rows=None) -> torch.Tensor:
    """A patched ``AutoencoderKL``'s encoder (+ quant conv) with tiling on: the untiled
    moments, full or streamed as ``diffusers_decode`` decides."""
    return _akl_call(akl, "encode", x, band_rows, post=akl.quant_conv)
