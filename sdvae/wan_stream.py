"""The Wan family within a memory budget: each chunk's local layers run over row bands.

A Wan decoder's layers after its mid block are local in space (causal 3-D convs, channel RMS
norms, the upsamplers, Wan 2.2's ``DupUp3D`` shortcuts): a band of output rows depends only
on a band of the mid block's rows a few rows wider, the halo. So per latent frame the
decoder's ``head`` (conv_in, the mid block, whose attention sees the whole frame, and the
first ``split`` up blocks) runs whole, and its ``tail`` (the rest) band by band, each band
with its halo recomputed. The encoder likewise: its ``head`` (conv_in and the down blocks)
band by band on each chunk of frames, its ``tail`` (the mid block, conv_out) whole. Exact:
every row a band keeps is computed from the same inputs as on the whole-tensor path.

The causal convs' kept frames (``ChunkState.frames``) become a ``BandFrames``: whole-frame
tensors, on the device or (``offload="cpu"``) in host memory, pinned on CUDA. A band reads the
rows it covers; it writes back the rows it owns at once, except those a later band of the
same chunk still reads (the next band's halo), which wait until no band reads them.

Memory is measured, not fitted: the planner runs this executor's own code (and, for the
whole-frame path, ``WanVAE``'s) on a meta twin with ``sdvae.memtrack`` over two chunks; a
chunk past the second adds what it adds to the whole-frame path (its frames of the output,
of the decoder's input), measured there from two chunks to three. It picks the split and the
band height: the largest bands that fit, with the fewest FLOPs recomputed in halos.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import torch
from torch import nn

from . import budget as B
from . import dispatch
from .memtrack import TensorMemory

__all__ = [
    "BandFrames",
    "BandState",
    "halo",
    "bands",
    "encoder_factor",
    "head_scale",
    "decode",
    "moments",
    "plan",
]


class BandFrames:
    """The kept frames of every causal op, whole-frame, read and written one row band at a
    time (the mapping ``ChunkState.frames`` is: ``get(op)``, ``frames[op] = kept``).

    ``height``: the band grid's rows (the latent rows); a tensor ``s`` times as tall (an op
    at ``s`` times the latent resolution) covers rows ``s lo .. s hi`` of the band
    ``lo .. hi``. ``offload``: the whole-frame tensors live in host memory (pinned on CUDA)
    and a band's rows are copied in; on the meta device only their shapes are kept (the
    planner's runs count what the device holds). A read is a view (no offload): the ops read
    their kept frames before they write the new ones, as ``CausalConv3d`` and ``Resample``
    do."""

    def __init__(self, height: int, device: torch.device, offload: bool, *,
                 host_apart: bool = True):  # fmt: skip
        self.height = height
        self.device = torch.device(device)
        self.offload = offload
        # a shape-only run for a CPU (``host_apart=False``): the host is the device, so the
        # offloaded frames count as the device's
        self.shapes_only = offload and self.device.type == "meta" and host_apart
        self.full: dict[nn.Module, torch.Tensor] = {}
        self.shapes: dict[nn.Module, tuple] = {}  # offloaded on meta: what would be held
        self.live: set[nn.Module] = set()  # ops whose frames come from an earlier chunk
        self.pending: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
        self.window(0, height, 0, height, height)

    def window(self, lo: int, hi: int, a: int, b: int, keep_from: int) -> None:
        """The band now running: rows ``lo .. hi`` computed, ``a .. b`` its own; later bands
        of this chunk read rows from ``keep_from`` on."""
        self.lo, self.hi, self.a, self.b, self.keep_from = lo, hi, a, b, keep_from

    def _scale(self, rows: int) -> int:
        s, r = divmod(rows, self.hi - self.lo)
        if r or s < 1:
            raise RuntimeError(f"a band of {self.hi - self.lo} rows met a tensor of {rows} rows")
        return s

    def _whole(self) -> bool:
        """The window is the whole frame (a head runs): kept frames of any height."""
        return self.lo == 0 and self.hi == self.height and self.a == 0 and self.b == self.height

    def get(self, op: nn.Module, default=None):
        if op not in self.live:
            return default
        if self._whole() and op in self.full:
            full = self.full[op]
            return full.to(self.device, non_blocking=True, copy=True) if self.offload else full
        if self.shapes_only:
            n, c, f, rows, w = self.shapes[op]
            if self._whole():
                return torch.empty((n, c, f, rows, w), dtype=self.dtype, device="meta")
            s = rows // self.height
            return torch.empty((n, c, f, (self.hi - self.lo) * s, w), dtype=self.dtype,
                               device="meta")  # fmt: skip
        full = self.full[op]
        s = full.shape[-2] // self.height
        rows = full[:, :, :, self.lo * s : self.hi * s]
        return rows.to(self.device, non_blocking=True, copy=True) if self.offload else rows

    def _alloc(self, shape, like: torch.Tensor) -> torch.Tensor:
        """A whole-frame tensor of ``shape``: on the device in ``like``'s layout, or
        (offloaded, outside a shape-only run) in host memory, pinned on CUDA (allocated
        pinned, never a copy of a pinned block), rows outermost after the batch: a band's
        rows are then one dense block (at batch 1), which a copy moves with one async memcpy
        (a strided pinned slice would be gathered on the host first, synchronously)."""
        host = self.offload and self.device.type != "meta"
        kw = {"dtype": like.dtype, "device": "cpu" if host else like.device}
        if host and self.device.type == "cuda":
            kw["pin_memory"] = True
        order = _dim_order(like)  # like's dims, outermost first
        if host:
            order = [0, 3] + [d for d in order if d not in (0, 3)]
        store = torch.empty([shape[d] for d in order], **kw)
        return store.permute([order.index(d) for d in range(5)])

    def _staged(self, full: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``src`` (on the device) as it goes into rows of ``full``: offloaded, first copied
        on the device into ``full``'s layout, so that the device-to-host copy is one dense
        async memcpy (a layout change across devices goes through pageable host memory)."""
        if not self.offload:
            return src
        order = _dim_order(full)
        staged = torch.empty([src.shape[d] for d in order], dtype=src.dtype, device=src.device)
        staged = staged.permute([order.index(d) for d in range(5)])
        return staged.copy_(src)

    def __setitem__(self, op: nn.Module, kept: torch.Tensor) -> None:
        self.dtype = kept.dtype
        if self._whole() and not self.shapes_only:
            full = self.full.get(op)
            if not self.offload:
                self.full[op] = kept
                return
            if full is None:
                full = self.full[op] = self._alloc(kept.shape, kept)
            full.copy_(self._staged(full, kept), non_blocking=True)
            return
        if self.shapes_only:  # the device's side only: the staged copy, the waiting rows
            rows = kept.shape[-2] if self._whole() else self.height * self._scale(kept.shape[-2])
            self.shapes[op] = (*kept.shape[:3], rows, kept.shape[-1])
            if self._whole():
                torch.empty_like(kept)  # staged for the copy out
                return
        s = self._scale(kept.shape[-2])
        full = self.full.get(op)
        if full is None and not self.shapes_only:
            shape = (*kept.shape[:3], self.height * s, kept.shape[-1])
            full = self.full[op] = self._alloc(shape, kept)
        own = kept[:, :, :, (self.a - self.lo) * s : (self.b - self.lo) * s]
        cut = min(max(self.keep_from, self.a), self.b)
        if cut > self.a:
            now = own[:, :, :, : (cut - self.a) * s]
            if self.shapes_only:
                torch.empty_like(now)  # staged for the copy out
            else:
                full[:, :, :, self.a * s : cut * s].copy_(self._staged(full, now),
                                                          non_blocking=self.offload)  # fmt: skip
        if cut < self.b:  # a later band still reads the old rows: write them after it
            part = own[:, :, :, (cut - self.a) * s :]
            if self.shapes_only:
                later = torch.empty_like(part)
            else:
                later = self._staged(full, part) if self.offload else part.clone()
            self.pending.append((full, cut * s, s, later))

    def flush(self, below: int | None = None) -> None:
        """Write the waiting rows that end at or above latent row ``below`` (None: all)."""
        keep = []
        for full, row, s, rows in self.pending:
            if below is None or row + rows.shape[-2] <= below * s:
                if full is not None:  # None: a shape-only run's
                    dst = full[:, :, :, row : row + rows.shape[-2]]
                    dst.copy_(rows, non_blocking=self.offload)
            else:
                keep.append((full, row, s, rows))
        self.pending = keep

    def end_chunk(self) -> None:
        self.flush()
        self.live = set(self.full) | set(self.shapes)
        self.window(0, self.height, 0, self.height, self.height)

    def nbytes(self, pinned: bool = False) -> int:
        """Bytes of the whole-frame kept frames (where they live: device or host);
        ``pinned``: as torch's pinned host allocator holds them (each rounded up to a power
        of two)."""
        e = torch.empty((), dtype=getattr(self, "dtype", torch.float32)).element_size()
        sizes = [t.numel() * t.element_size() for t in self.full.values()]
        sizes += [math.prod(s) * e for s in self.shapes.values()]
        return sum(1 << (b - 1).bit_length() if pinned and b else b for b in sizes)


def _dim_order(t: torch.Tensor) -> list[int]:
    """``t``'s dims from the outermost in memory to the innermost (by stride; ties, as size-1
    dims make them, in dim order)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


class BandState:
    """A ``ChunkState`` whose frames are a ``BandFrames``."""

    def __init__(self, frames: BandFrames):
        self.frames = frames
        self.first = True
        self.last = False


def bands(height: int, rows: int, halo_rows: int) -> list[tuple[int, int, int, int]]:
    """``(lo, hi, a, b)`` per band of ``rows`` latent rows over ``height``: rows ``a .. b``
    its own, ``lo .. hi`` computed (``halo_rows`` more each side, within the frame)."""
    out = []
    for a in range(0, height, rows):
        b = min(a + rows, height)
        out.append((max(a - halo_rows, 0), min(b + halo_rows, height), a, b))
    return out


def _run_bands(state: BandState, band_list, fn) -> None:
    """``fn(lo, hi, a, b)`` per band, with the frames' window set and the rows no later band
    reads written back; then the chunk's frames are final."""
    frames = state.frames
    for j, (lo, hi, a, b) in enumerate(band_list):
        frames.flush(below=lo)
        nxt = band_list[j + 1][0] if j + 1 < len(band_list) else frames.height
        frames.window(lo, hi, a, b, nxt)
        fn(lo, hi, a, b)
    frames.end_chunk()


# ---------------------------------------------------------------------------- halo
def _meta_model(vae) -> nn.Module:
    """A shape-only twin of ``vae`` (built on the meta device: no memory), with its fused
    choices and layout."""
    with torch.device("meta"):
        twin = type(vae)(vae.config)
    ours = dict(vae.named_modules())
    for name, m in twin.named_modules():
        if hasattr(m, "fused"):
            m.fused = ours[name].fused
    twin.memory_format = vae.memory_format
    twin.requires_grad_(False)
    return twin


_PROFILES: dict = {}
_PLANS: dict = {}
#: the kept frames of this thread's last shape-only banded run (the planner reads their bytes)
_LAST = threading.local()


def halo(vae, op: str, split: int | None = 0) -> int:
    """Rows of the band grid (the decoder tail's input, or the encoder head's output: the
    latent rows, with ``split=0``) a band needs on each side; ``profile``'s."""
    return profile(vae, op, split)[0]


def profile(vae, op: str, split: int | None = 0) -> tuple[int, float]:
    """``(reach, banded share)`` of the decoder's tail from up block ``split`` on
    (``op="decode"``) or the encoder's head, conv_in and its first ``split`` down blocks
    (``"encode"``; None: all), once per architecture:

    * reach: the rows a band spoils at each edge, in rows of the band grid, summed over the
      part's convs (a conv with kernel ``k`` and padding ``p`` spoils ``max(p, k - 1 - p)``
      rows of its input's resolution; a conv at ``s`` times the grid's resolution spoils
      ``1 / s`` grid rows per row);
    * banded share: the banded part's share of the decoder's (encoder's) conv FLOPs.

    Both read off the eager twin run on the meta device (a second chunk: the temporal
    upsamplers run)."""
    key = (type(vae), repr(vae.config), op, split)
    if key not in _PROFILES:
        _PROFILES[key] = _profile(vae, op, split)
    return _PROFILES[key]


def _profile(vae, op: str, split: int | None) -> tuple[int, float]:
    twin = _meta_model(vae)
    for m in twin.modules():
        if hasattr(m, "fused"):
            m.fused = False  # the eager modules call every conv (the fused upsampler folds)
    part = twin.decoder if op == "decode" else twin.encoder
    f = encoder_factor(twin, split) if op == "encode" else 1
    rows, grid, reach, flops = 8, [0], [], {"head": 0, "tail": 0}
    where = ["head"]

    def hook(m, args, out):
        k, p = m.weight.shape[-2], m.padding[-2] if isinstance(m.padding, tuple) else 0
        if isinstance(m, nn.Conv2d) and m.stride[-1] == 2:
            p = 0  # the downsampler's zero pad is at the bottom only (its ZeroPad2d)
        flops[where[0]] += out.numel() * m.weight[0].numel()
        banded = (where[0] == "tail") == (op == "decode")
        spoil = max(p, k - 1 - p)
        if banded and spoil:
            reach.append(spoil * grid[0] / args[0].shape[-2])

    state = BandState(BandFrames(rows, "meta", False))
    with torch.no_grad():
        for first in (True, False):  # measured on the second chunk
            state.first = first
            hooks = []
            if not first:
                hooks = [m.register_forward_hook(hook) for m in part.modules()
                         if isinstance(m, (nn.Conv2d, nn.Conv3d))]  # fmt: skip
            try:
                where[0] = "head"
                if op == "decode":
                    x = torch.empty((1, part.conv_in.in_channels, 1, rows, 8), device="meta")
                    y = part.head(x, state, split)
                    grid[0] = y.shape[-2]
                    where[0] = "tail"
                    part.tail(y, state, split)
                else:
                    x = torch.empty((1, part.conv_in.in_channels, 1 if first else 4, rows * f,
                                     8 * f), device="meta")  # fmt: skip
                    grid[0] = rows
                    y = part.head(x, state, split)
                    where[0] = "tail"
                    part.tail(y, state, split)
            finally:
                for h in hooks:
                    h.remove()
            state.frames.end_chunk()
    banded = flops["tail"] if op == "decode" else flops["head"]
    return math.ceil(sum(reach) - 1e-9), banded / max(flops["head"] + flops["tail"], 1)


def encoder_factor(vae, split: int | None = None) -> int:
    """The spatial reduction (patches excluded) of the encoder's conv_in and first ``split``
    down blocks (None: all): 2 per spatial downsampler."""
    downs = [m for b in vae.encoder.down_blocks[:split] for m in b.modules()
             if getattr(m, "mode", "").startswith("downsample")]  # fmt: skip
    return 2 ** len(downs)


# ------------------------------------------------------------------------ executors
def _fmt(x: torch.Tensor) -> torch.memory_format:
    cl3 = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if cl3 else torch.contiguous_format


def _host_apart(vae) -> bool:
    """Whether host memory is apart from the device's: not for a CPU (a meta twin made for
    one says so in ``measured_for``)."""
    dev = getattr(vae, "measured_for", None)
    return (dev if dev is not None else next(vae.parameters()).device).type != "cpu"


def _measured_bands(band_list: list, reach: int, rows: int) -> list:
    """On the meta device (the planner's runs) every band away from the edges costs the
    same: the first two, the last two, and a run in the middle long enough that its last
    band waits on every earlier band's rows a real run would (``2 reach / rows`` bands)
    stand for them all."""
    run = 2 * math.ceil(reach / rows) + 2
    if len(band_list) <= run + 4:
        return band_list
    mid = (len(band_list) - run) // 2
    return band_list[:2] + band_list[mid : mid + run] + band_list[-2:]


def _rows_into(dst, y, a: int, b: int, lo: int, hi: int, height: int):
    """Rows ``a .. b`` of band ``y`` (rows ``lo .. hi``) into ``dst`` (allocated like ``y``
    at the whole frame's height when None); returns ``dst``."""
    s = y.shape[-2] // (hi - lo)
    if dst is None:
        dst = torch.empty((*y.shape[:3], s * height, y.shape[-1]), dtype=y.dtype,
                          device=y.device, memory_format=_fmt(y))  # fmt: skip
    dst[:, :, :, a * s : b * s] = y[:, :, :, (a - lo) * s : (b - lo) * s]
    return dst


def _setup(vae, op: str, x: torch.Tensor, height: int, rows: int, offload: bool,
           split) -> tuple[BandState, list]:  # fmt: skip
    """A banded run's state (its kept frames over a grid of ``height`` rows) and its bands
    of ``rows`` (on the meta device: those ``_measured_bands`` keeps)."""
    state = BandState(BandFrames(height, x.device, offload, host_apart=_host_apart(vae)))
    if x.is_meta:  # the planner reads its bytes (a real run's frames die with the call)
        _LAST.frames = state.frames
    reach = halo(vae, op, split)
    band_list = bands(height, rows, reach)
    if x.is_meta:
        band_list = _measured_bands(band_list, reach, rows)
    return state, band_list


def head_scale(vae, split: int) -> int:
    """How many times taller than the latents the decoder's first ``split`` up blocks make
    a frame."""
    ups = [m for b in vae.decoder.up_blocks[:split] for m in b.modules()
           if getattr(m, "mode", "").startswith("upsample")]  # fmt: skip
    return 2 ** len(ups)


def decode(vae, x: torch.Tensor, *, rows: int, offload: bool, split: int = 0) -> torch.Tensor:
    """The decoder on ``x`` (the post-quant conv's output, (N, C, t, h, w)): its head and
    first ``split`` up blocks whole, the rest over bands of ``rows`` rows of their input:
    ``WanVAE.decode``'s frames (unclamped, patchified)."""
    dec = vae.decoder
    height = x.shape[-2] * head_scale(vae, split)
    state, band_list = _setup(vae, "decode", x, height, rows, offload, split)

    def chunk(xi: torch.Tensor, st) -> torch.Tensor:
        h = dec.head(xi, st, split)
        st.frames.end_chunk()  # the head's frames are whole: final now
        out = [None]

        def band(lo, hi, a, b):
            y = dec.tail(h[:, :, :, lo:hi].contiguous(memory_format=_fmt(h)), st, split)
            out[0] = _rows_into(out[0], y, a, b, lo, hi, height)

        _run_bands(st, band_list, band)
        return out[0]

    return vae.decode_chunks(x, chunk, state)


def moments(vae, video: torch.Tensor, *, rows: int, offload: bool,
            split: int | None = None) -> torch.Tensor:  # fmt: skip
    """The encoder's moments of ``video`` (patchified, in the model's layout): conv_in and
    its first ``split`` down blocks (None: all) over bands of ``rows`` rows of their output,
    the rest whole."""
    enc = vae.encoder
    f = encoder_factor(vae, split)
    height = video.shape[-2] // f
    state, band_list = _setup(vae, "encode", video, height, rows, offload, split)

    def chunk(v: torch.Tensor, st) -> torch.Tensor:
        feat = [None]

        def band(lo, hi, a, b):
            y = enc.head(v[:, :, :, lo * f : hi * f].contiguous(memory_format=_fmt(v)), st,
                         split)  # fmt: skip
            feat[0] = _rows_into(feat[0], y, a, b, lo, hi, height)

        _run_bands(st, band_list, band)
        h = feat.pop()
        return enc.tail(h, st, split)

    return vae.encode_chunks(video, chunk, state)


# ------------------------------------------------------------------------- planner
def _measure(twin, op: str, shape, dtype, device, rows: int | None, split: int | None,
             offload: bool, raw: bool) -> int:  # fmt: skip
    """Peak bytes of the twin's ``decode`` (``shape``: its latents) or ``encode`` (its video)
    on the meta device, beyond its input: banded with ``rows`` (None: the whole-frame
    path)."""
    twin.to(dtype)
    twin.measured_for = torch.device(device)
    x = torch.empty(shape, dtype=dtype, device="meta")
    kw = {} if rows is None else {"band_rows": rows, "offload": "cpu" if offload else None}
    if rows is not None:
        kw["band_split"] = split
    with torch.no_grad(), TensorMemory("meta", collect=False) as tracker, \
            dispatch.metered(tracker, device):  # fmt: skip
        if op == "decode":
            twin.decode(x, raw=raw, **kw)
        else:
            twin.encode(x, raw=raw, **kw)
    return tracker.peak


def plan(vae, op: str, shape, *, dtype=None, device=None, max_memory=None, offload=None,
         band_rows: int | None = None, band_split: int | None = None,
         raw: bool = False) -> B.MemoryPlan:  # fmt: skip
    """``WanVAE.memory_plan``: the plan of ``decode`` (``shape``: the latents, (N, C, t, h,
    w) or (N, C, h, w)) or ``encode`` (``shape``: the video or image) within ``max_memory``.
    ``path``: ``"full"`` (the whole-frame chunked path: it fits, or no budget),
    ``"streamed"`` (bands of ``plan.rows[0]`` rows of the banded part's input, the decoder's
    up blocks from ``plan.split`` on, or the encoder's first ``plan.split`` down blocks) or
    ``"none"``. ``band_rows`` / ``band_split``: plan those bands."""
    if op not in ("decode", "encode"):
        raise ValueError(f"op must be 'decode' or 'encode', got {op!r}")
    p = next(vae.parameters())
    dtype = p.dtype if dtype is None else dtype
    device = p.device if device is None else torch.device(device)
    fused = tuple(m.fused for m in vae.modules() if hasattr(m, "fused"))
    key = (type(vae), repr(vae.config), op, tuple(shape), dtype, str(device), max_memory,
           offload, band_rows, band_split, raw, vae.memory_format, fused)  # fmt: skip
    if key not in _PLANS:
        if len(_PLANS) > 64:
            _PLANS.clear()
        _PLANS[key] = _plan(vae, op, shape, dtype=dtype, device=device, max_memory=max_memory,
                            offload=offload, band_rows=band_rows, band_split=band_split,
                            raw=raw)  # fmt: skip
    plan = dataclasses.replace(_PLANS[key])  # the caller's copy; the host memory read now
    if plan.offload == "cpu" and plan.host_bytes:
        plan.host_available = B.host_memory_available()
        if plan.host_short:
            plan.path = "none"
    return plan


def _plan(vae, op, shape, *, dtype, device, max_memory, offload, band_rows, band_split, raw):
    p = next(vae.parameters())
    dtype = p.dtype if dtype is None else dtype
    device = p.device if device is None else torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    budget, offload = B.parse_memory(max_memory), B.check_offload(offload)
    if not raw and not vae.config.has_latent_stats:
        raise ValueError("this WanConfig has no latents_mean/latents_std: plan with raw=True")
    cfg = vae.config
    shape = tuple(int(s) for s in shape)
    chans = cfg.z_dim if op == "decode" else cfg.image_channels
    if len(shape) == 4:
        shape = (*shape[:2], 1, *shape[2:])
    if len(shape) != 5 or shape[1] != chans or min(shape) < 1:
        raise ValueError(f"shape must be (N, {chans}, T, H, W) or (N, {chans}, H, W) for {op} "
                         f"with positive sizes, got {shape}")  # fmt: skip
    twin = _meta_model(vae)
    n, _, t, h, w = shape
    pt = cfg.patch_size or 1
    if op == "decode":
        steps, top = t, len(vae.decoder.up_blocks)
    else:
        if (t - 1) % 4:
            raise ValueError(f"shape has {t} frames: the encoder takes 1 + 4k")
        steps, top = 1 + (t - 1) // 4, len(vae.encoder.down_blocks)

    def grid_of(s: int) -> int:
        """Rows of the band grid of split ``s``: the banded part's input (decode) or output
        (encode)."""
        if op == "decode":
            return h * head_scale(vae, s)
        return h // (pt * encoder_factor(vae, s))

    def bandable(s: int) -> bool:
        return op == "decode" or h % (pt * encoder_factor(vae, s)) == 0

    def inp(k: int) -> tuple:
        """The input of ``k`` chunks."""
        if op == "decode":
            return (n, cfg.z_dim, k, h, w)
        return (n, cfg.image_channels, 1 + 4 * (k - 1), h, w)

    reserve = B.FIXED_RESERVE + (B.CUDA_RESERVE if device.type == "cuda" else 0)
    costs: dict = {}
    kept: dict = {}  # bytes of the kept frames (in host memory with offload)

    # A chunk past the second adds the same bytes to every path (its frames of the output,
    # of the decoder's input): the whole-frame path's growth from two chunks to three. The
    # runs of two or three chunks keep their last chunk's frames, so they measure a middle
    # chunk (a real run's last keeps none: less); a one-chunk run is measured as it is.
    two = min(steps, 2)
    twin.keep_last_frames = steps > 1
    p2 = _measure(twin, op, inp(two), dtype, device, None, 0, False, raw)
    p3 = _measure(twin, op, inp(3), dtype, device, None, 0, False, raw) if steps > 2 else p2
    grow = max(p3 - p2, 0) * (steps - 2) if steps > 2 else 0
    full = reserve + p2 + grow

    def cost(rows: int, split: int = 0) -> int:
        """The peak with bands of ``rows`` of the banded part (up blocks ``split`` on)."""
        if (rows, split) not in costs:
            peak = _measure(twin, op, inp(two), dtype, device, rows, split, off, raw)
            costs[rows, split] = reserve + peak + grow
            kept[rows, split] = _LAST.frames.nbytes(pinned=device.type == "cuda")
        return costs[rows, split]

    off = offload == "cpu"
    path, rows, split, grid = "full", h, 0, h
    if band_rows is not None:
        split = band_split if band_split is not None else (0 if op == "decode" else top)
        if not bandable(split):
            raise ValueError(f"shape {shape}: a banded encode of {split} down blocks needs frame "
                             f"heights that are multiples of "
                             f"{pt * encoder_factor(vae, split)}")  # fmt: skip
        path, rows, grid = "streamed", int(band_rows), grid_of(split)
        streamed = smallest = cost(rows, split)
    elif budget is None or full <= budget:
        streamed = smallest = full
    else:
        # Splits whose banded part does a twentieth of the conv FLOPs or more, the most
        # whole first (decode: the up blocks before the split run whole; encode: the down
        # blocks after it), each with its largest bands that fit; the one that recomputes
        # the fewest FLOPs in its halos wins, and one whose bands cover its grid in one
        # stops the search.
        order = range(top, -1, -1) if op == "decode" else range(top + 1)
        splits = [s for s in order if bandable(s) and profile(vae, op, s)[1] >= 0.05]
        if not splits:
            raise ValueError(f"shape {shape}: the whole-frame encode needs "
                             f"~{B.format_bytes(full)}, over the budget, and no banded split "
                             f"divides its frame height (give heights that are multiples of "
                             f"{pt * encoder_factor(vae)})")  # fmt: skip
        best, smallest = None, None
        for s in splits:
            g = grid_of(s)
            c1 = cost(1, s)
            smallest = c1 if smallest is None else min(smallest, c1)
            if c1 > budget:
                continue
            r = B.largest_rows(lambda r, s=s: cost(r, s), g, budget, c1)
            reach, share = profile(vae, op, s)
            covered = sum(hi - lo for lo, hi, _, _ in bands(g, r, reach)) / g
            work = 1 + share * (covered - 1)
            if best is None or work < best[0]:
                best = (work, r, s, g)
            if covered == 1:
                break
        if best is None:
            path, rows, streamed = "none", 1, smallest
        else:
            path, (_, rows, split, grid) = "streamed", best
            streamed = cost(rows, split)
    nb = len(bands(grid, rows, 0))
    if op == "decode":
        stage = "decoder up_blocks" + (f"[{split}:]" if split else "") + " + conv_out"
    else:
        stage = "encoder conv_in + down_blocks" + (f"[:{split}]" if split < top else "")
    passes = [B.PassPlan(stage, op, grid, w, rows, nb, 0, streamed)]
    result = B.MemoryPlan(op, shape, dtype, device, offload, budget, path, full, streamed,
                          smallest, passes if path != "full" else [], [],
                          split=split)  # fmt: skip
    if off and path != "full":
        result.host_bytes = kept.get((rows, split), 0)
    return result
