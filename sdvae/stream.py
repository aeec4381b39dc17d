"""Exact streamed encode and decode within a memory budget (``max_memory`` / ``offload``).

A full decode holds several full-resolution activations at once (the 256-channel upsampled
tensor of the last level alone is 8 GiB in fp16 for a 4096^2 image). The encoder and the
decoder are made of local operations (3x3 convs, the nearest-x2 upsample + conv, the stride-2
downsample, GroupNorm's apply, SiLU, residual adds) and two kinds of global step: GroupNorm
statistics, and one attention at the lowest resolution. So this module runs them layer by
layer over row bands, with the same arithmetic as the full computation:

* Each *pass* reads rows of stored full-size tensors and writes rows of one output tensor,
  band by band. A 3x3 conv band of output rows ``[r0, r1)`` reads input rows
  ``[r0 - 1, r1 + 1)`` clipped to the image, zero-padded only at the image's top and bottom
  edges; GroupNorm+SiLU is applied to the halo rows too (before the conv's padding). The
  encoder's downsample (pad one column right and one row bottom, 3x3 stride 2) reads rows
  ``[2 r0, 2 r1 + 1)``, the bottom pad only at the image edge, the right pad always. The
  upsample (nearest x2 + 3x3) reads rows ``[(r0 - 1) // 2, r1 // 2 + 1)`` of its input.
* GroupNorm statistics: per band in fp32 (float64 for float64), merged with Chan's parallel
  formula (``sdvae.kernels.group_norm_band``), accumulated while the band that feeds the
  GroupNorm is written, so no extra read pass.
* ResnetBlock: pass B writes ``h = conv1(silu(gn1(x)))`` band by band (and gn2's
  statistics of h; with a 1x1 shortcut also ``shortcut(x)`` into the output); pass C writes
  ``conv2(silu(gn2(h))) + residual``, over x in place when the channels match (a band of
  the output reads only the same rows of x).
* The upsampled input of each decoder level's first block is never stored: pass A
  recomputes it band by band from the quarter-size previous output (its statistics, and
  either the block's 1x1 shortcut or, with equal channels, the tensor itself as the block's
  output buffer), pass B recomputes it again with halos.
* Attention: global and exact, by bands of query rows: pass KV writes K and V of every
  pixel (GroupNorm applied band by band), pass QO computes the attention of each band of
  queries against all of K and V, the output projection and the residual, in place.
* ``offload="cpu"``: the stored tensors live in (pinned) host memory, rows outermost so that
  a band's rows are one dense block; each is copied in and out on a side CUDA stream, one
  band ahead, overlapping compute, with the host at most two bands ahead (``_Mover``). On
  the CPU the same code runs with plain host tensors and copies.

The engine reads the weights of the modules by the names sdvae's model and diffusers'
``Encoder``/``Decoder`` share, so it serves ``sdvae.VAE`` (unfused: eager ops; optimized:
the band GroupNorm kernels, ``sdvae.ops`` convs, the folded transposed-conv upsampler and
the attention kernel, wherever the model uses them) and a diffusers ``AutoencoderKL``.
Under accelerate's hooks (sequential CPU offload keeps weights on the meta device between
calls) ``run`` runs every hooked module's hook around the call, so the weights are real while
it reads them; weights on the meta device with no hook are refused (``F.conv2d`` of a real
input and a meta weight returns uninitialised memory).

Memory: ``pass_cost`` measures the most one band of a pass allocates by running this
module's own band code on the meta device under ``sdvae.memtrack.TensorMemory`` (kernels'
internal buffers added as spikes); ``sdvae.budget`` adds the stored tensors each pass keeps
and picks the band heights for a budget.
"""

from __future__ import annotations

import dataclasses
import traceback

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import sdpa_extra_bytes, weights_of
from .steps import Attention, Conv, ConvIn, Downsample, Norm, Out, Resnet, Upsample, lower, weights

__all__ = [
    "run",
    "band_list",
    "sdpa_extra_bytes",
    "program",
    "pass_cost",
    "band_peak",
    "memory_format_of",
    "check_encoder_input",
]


# ------------------------------------------------------------------------- the program
@dataclasses.dataclass
class _Buf:
    """A full-size tensor some passes write and read."""

    name: str
    c: int
    h: int
    w: int
    device_only: bool = False  # attention K/V, (N, heads, h * w, c / heads): on the device
    heads: int = 1
    first: int = -1
    last: int = -1
    tensor: torch.Tensor | None = None


@dataclasses.dataclass
class _Slot:
    """GroupNorm statistics of a tensor, accumulated by the pass that writes it; ``fused``:
    the GroupNorm that reads them runs the band kernels (else their reference)."""

    groups: int
    fused: bool = False
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    count: float = 0
    rstd: torch.Tensor | None = None

    def clear(self) -> None:
        self.mean = self.m2 = self.rstd = None
        self.count = 0


@dataclasses.dataclass
class _Virtual:
    """The upsampled tensor ``up(y)``, recomputed band by band from ``y``."""

    y: _Buf
    up: Upsample


@dataclasses.dataclass
class _Pass:
    name: str
    kind: str  # conv_in | res_a | res_b | res_c | attn_kv | attn_qo | down | out
    step: object
    h: int  # output rows (the band axis) and columns of the pass
    w: int
    src: object = None  # _Buf / _Virtual / "input"
    out: _Buf | None = None  # written rows
    extra: _Buf | None = None  # res_a/res_b: the block output written with the shortcut
    res: _Buf | None = None  # res_c: the residual read (rows of the output)
    stats_in: _Slot | None = None
    stats_out: _Slot | None = None
    k: _Buf | None = None  # attention K and V
    v: _Buf | None = None
    materialize: bool = False  # res_a: x itself is the block's output buffer


class _Program:
    def __init__(self, kind, steps, n, h, w, cin, elem):
        self.kind, self.steps, self.n, self.elem = kind, steps, n, elem
        self.passes: list[_Pass] = []
        self.bufs: list[_Buf] = []
        self.slots: list[_Slot] = []
        self.in_shape = (n, cin, h, w)
        self._build(h, w)

    def _buf(self, name, c, h, w, **kw) -> _Buf:
        b = _Buf(name, c, h, w, **kw)
        self.bufs.append(b)
        return b

    def _add(self, p: _Pass) -> None:
        i = len(self.passes)
        self.passes.append(p)
        for b in (p.src.y if isinstance(p.src, _Virtual) else p.src, p.out, p.extra, p.res,
                  p.k, p.v):  # fmt: skip
            if isinstance(b, _Buf):
                if b.first < 0:
                    b.first = i
                b.last = i

    def _new_slot(self, norm: Norm) -> _Slot:
        slot = _Slot(norm.groups, norm.fused)
        self.slots.append(slot)
        return slot

    def _slot(self, i):
        """The statistics slot for the GroupNorm of step ``i + 1``, if it starts with one."""
        s = self.steps[i + 1] if i + 1 < len(self.steps) else None
        norm = s.norm1 if isinstance(s, Resnet) else getattr(s, "norm", None)
        return self._new_slot(norm) if isinstance(s, (Resnet, Attention, Out)) else None

    def _build(self, h, w):
        cur = None  # _Buf or _Virtual
        stats = None
        for i, st in enumerate(self.steps):
            if isinstance(st, ConvIn):
                out = self._buf(st.name, st.cout, h, w)
                stats = self._slot(i)
                self._add(_Pass(st.name, "conv_in", st, h, w, "input", out, stats_out=stats))
                cur = out
            elif isinstance(st, Resnet):
                cur, stats = self._res(i, st, cur, stats)
            elif isinstance(st, Attention):
                kw = dict(device_only=True, heads=st.heads)
                k = self._buf(st.name + ".k", st.channels, cur.h, cur.w, **kw)
                v = self._buf(st.name + ".v", st.channels, cur.h, cur.w, **kw)
                self._add(_Pass(st.name + " kv", "attn_kv", st, cur.h, cur.w, cur,
                                stats_in=stats, k=k, v=v))  # fmt: skip
                nxt = self._slot(i)
                self._add(_Pass(st.name + " qo", "attn_qo", st, cur.h, cur.w, cur, cur,
                                stats_in=stats, stats_out=nxt, k=k, v=v))  # fmt: skip
                stats = nxt
            elif isinstance(st, Upsample):
                if not isinstance(self.steps[i + 1], Resnet):
                    raise ValueError(f"{st.name}: an upsampler must be followed by a resnet")
                cur, stats = _Virtual(cur, st), None
            elif isinstance(st, Downsample):
                out = self._buf(st.name, st.channels, cur.h // 2, cur.w // 2)
                nxt = self._slot(i)
                self._add(_Pass(st.name, "down", st, out.h, out.w, cur, out, stats_out=nxt))
                cur, stats = out, nxt
            elif isinstance(st, Out):
                self._add(_Pass(st.name, "out", st, cur.h, cur.w, cur, stats_in=stats))
                cur = None
        self.out_hw = (self.passes[-1].h, self.passes[-1].w)
        self.out_c = self.steps[-1].cout

    def _res(self, i, st: Resnet, cur, stats):
        virtual = isinstance(cur, _Virtual)
        hh, ww = (cur.y.h * 2, cur.y.w * 2) if virtual else (cur.h, cur.w)
        if virtual:
            stats = self._new_slot(st.norm1)
            out = self._buf(st.name, st.cout, hh, ww)
            if st.shortcut is None:  # x itself becomes the block's output buffer
                self._add(_Pass(st.name + " A", "res_a", st, hh, ww, cur, out, stats_out=stats,
                                materialize=True))  # fmt: skip
                cur = out
            else:
                self._add(_Pass(st.name + " A", "res_a", st, hh, ww, cur, out, stats_out=stats))
        h = self._buf(st.name + ".h", st.cout, hh, ww)
        hstats = self._new_slot(st.norm2)
        if isinstance(cur, _Virtual):  # shortcut already in `out`
            self._add(_Pass(st.name + " B", "res_b", st, hh, ww, cur, h, stats_in=stats,
                            stats_out=hstats))  # fmt: skip
            res = out
        elif st.shortcut is not None:
            out = self._buf(st.name, st.cout, hh, ww)
            self._add(_Pass(st.name + " B", "res_b", st, hh, ww, cur, h, extra=out,
                            stats_in=stats, stats_out=hstats))  # fmt: skip
            res = out
        else:
            self._add(_Pass(st.name + " B", "res_b", st, hh, ww, cur, h, stats_in=stats,
                            stats_out=hstats))  # fmt: skip
            res = cur
        nxt = self._slot(i)
        self._add(_Pass(st.name + " C", "res_c", st, hh, ww, h, res, res=res, stats_in=hstats,
                        stats_out=nxt))  # fmt: skip
        return res, nxt


# ------------------------------------------------------------------------- the runner
class _Mover:
    """Moves rows between stored tensors and the device.

    Without offload every stored tensor lives on the device and a read is a view (never
    written through). With ``offload="cpu"`` stored tensors live in host memory (pinned on
    CUDA), row-major: storage ``(H, N, C, W)`` for an NCHW run, ``(H, N, W, C)`` for
    channels_last, seen as ``(N, C, H, W)``, so the rows of any band are one dense block and
    every copy in or out is one dense transfer (pinned to device: a real asynchronous copy; a
    strided host view would go through pageable temporaries, blocking). A band arrives on the
    device as that block and is made dense in the run's layout there; a written band is laid
    out as a block on the device before it is copied out (both device temporaries are
    tensors: the planner counts them). On CUDA the copies run on a side stream, the next
    band's rows are copied in while the current band computes, at most two written bands wait
    for their copies (the compute stream waits for the oldest before a third), and the host
    runs at most ``AHEAD`` bands ahead of the device (it waits on an event per band), so the
    blocks the allocator holds for pending copies stay bounded. On the CPU and on the meta
    device (the planner) the same code runs with plain copies."""

    AHEAD = 2

    def __init__(self, device: torch.device, offload: bool, fmt: torch.memory_format):
        self.device, self.offload, self.fmt = device, offload, fmt
        self.cl = fmt == torch.channels_last
        self.cuda = offload and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._ahead: dict = {}
        self._pending: list = []
        self._ticks: list = []

    def _block(self, t: torch.Tensor) -> torch.Tensor:
        """The ``(N, C, r, W)`` rows ``t`` as a row-major ``(r, N, ., .)`` tensor (a dense
        block when ``t`` is rows of an offloaded tensor)."""
        return t.permute(2, 0, 3, 1) if self.cl else t.permute(2, 0, 1, 3)

    def _image(self, block: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_block``: a row-major block seen as ``(N, C, r, W)``."""
        return block.permute(1, 3, 0, 2) if self.cl else block.permute(1, 2, 0, 3)

    def alloc(self, buf: _Buf, shape, dtype, fmt) -> torch.Tensor:
        if self.offload and not buf.device_only:
            n, c, h, w = shape
            rows = (h, n, w, c) if self.cl else (h, n, c, w)
            if self.device.type == "meta":
                return self._image(torch.empty(rows, dtype=dtype, device="meta"))
            return self._image(torch.empty(rows, dtype=dtype, pin_memory=self.cuda))
        return torch.empty(shape, dtype=dtype, device=self.device, memory_format=fmt)

    def _copy_in(self, t: torch.Tensor, a: int, b: int):
        block = self._block(t[:, :, a:b])  # dense host rows
        if self.stream is None:
            return block.clone(), None
        with torch.cuda.stream(self.stream):
            dev = block.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return dev, ev

    def prefetch(self, buf: _Buf, a: int, b: int) -> None:
        if self.offload and not buf.device_only and (id(buf), a, b) not in self._ahead:
            self._ahead[(id(buf), a, b)] = self._copy_in(buf.tensor, a, b)

    def read(self, buf: _Buf, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of ``buf`` on the device (a view when it lives there: never written)."""
        if not self.offload or buf.device_only:
            return buf.tensor[:, :, a:b]
        got = self._ahead.pop((id(buf), a, b), None)
        dev, ev = got if got is not None else self._copy_in(buf.tensor, a, b)
        if ev is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ev)
            dev.record_stream(current)
        return self._image(dev).contiguous(memory_format=self.fmt)

    def write(self, buf: _Buf, a: int, band: torch.Tensor) -> None:
        dst = buf.tensor[:, :, a : a + band.shape[2]]
        if not self.offload or buf.device_only:
            dst.copy_(band)
            return
        src = self._block(band).contiguous()  # the band as one row block, on the device
        ev = None
        if self.stream is None:
            self._block(dst).copy_(src)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._block(dst).copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            src.record_stream(self.stream)
        self._pending.append((src, ev))
        if len(self._pending) > 2:
            _, old = self._pending.pop(0)
            if old is not None:
                torch.cuda.current_stream(self.device).wait_event(old)

    def tick(self) -> None:
        """Once per band: on CUDA with offload the host waits until the device is at most
        ``AHEAD`` bands behind it (blocks freed while their copies or reads are pending stay
        held by the allocator, so a host far ahead would hold ever more of them)."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._ticks.append(ev)
        if len(self._ticks) > self.AHEAD:
            self._ticks.pop(0).synchronize()

    def drain(self) -> None:
        self._ahead.clear()
        if self.stream is not None:
            self.stream.synchronize()
        self._pending.clear()
        self._ticks.clear()

    def release(self) -> None:
        """After the run: the pinned host allocator keeps freed blocks cached (each rounded
        up to a power of two), tens of GiB after a big offloaded decode; hand them back."""
        if not self.cuda:
            return
        self.drain()
        accelerator = getattr(torch, "accelerator", None)
        empty = getattr(accelerator, "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None
        )
        if empty is not None:
            empty()


def _kernel_fits(x: torch.Tensor) -> bool:
    """Whether the band GroupNorm kernels take ``x`` (int32 offsets inside a sample); else
    they run their reference, and so does the planner's estimate."""
    return x.shape[1:].numel() < 2**31


def _pads(r0, r1, height) -> tuple[int, int, int, int]:
    """Rows [max(r0 - 1, 0), min(r1 + 1, height)) and the zero rows a 3x3 conv needs on top
    and bottom (only at the image's edges)."""
    a, b = max(r0 - 1, 0), min(r1 + 1, height)
    return a, b, 1 if r0 == 0 else 0, 1 if r1 == height else 0


class _Runner:
    """Runs a program's passes band by band. On the meta device (``real`` names the device
    the estimate is for) the same code runs shape-only under a ``TensorMemory`` tracker: the
    planner's band costs; fused ops then allocate what their kernels return, and memory a
    kernel holds inside itself is counted with ``tracker.spike``."""

    def __init__(self, prog, rows, device, dtype, fmt, offload: bool, *, real=None,
                 tracker=None):  # fmt: skip
        self.prog, self.rows = prog, rows
        self.device, self.dtype, self.fmt = device, dtype, fmt
        self.meta = device.type == "meta"
        self.real = torch.device(real) if real is not None else device
        self.tracker = tracker
        self._meta_w: dict = {}
        self.mv = _Mover(device, offload, fmt)
        self.input = self.result = None

    def _spike(self, nbytes: int) -> None:
        if self.tracker is not None:
            self.tracker.spike(int(nbytes))

    def _w(self, t):
        """A weight as the ops take it: itself, or its meta twin on the meta device."""
        if t is None or not self.meta:
            return t
        got = self._meta_w.get(id(t))
        if got is None:
            got = self._meta_w[id(t)] = t.to("meta")
        return got

    # ---------------------------------------------------------------------- ops
    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` dense in the run's layout. A band's rows of a stored tensor are not (NCHW, or
        channels_last with a batch of 2+), and a conv copies such an operand inside itself
        (``sdvae.ops``' C++ entry points: x and the residual on CUDA, x on the CPU; ATen's
        cuDNN and oneDNN convolutions and its nearest upsample likewise), where no tensor
        shows it and the planner could not count it. The copy made here is a tensor: the
        planner's meta run counts it (no copy when ``t`` is dense already)."""
        return t.contiguous(memory_format=self.fmt)

    def _conv(self, x, conv: Conv, top: int, bottom: int, residual=None):
        """3x3 (or 1x1, top = bottom = 0) stride-1 conv of a band, padded with zero rows only
        where ``top``/``bottom`` say (the image's edges) and with zero columns always."""
        w, b = self._w(conv.weight), self._w(conv.bias)
        side = w.shape[-1] // 2
        if conv.fused:
            x = self._dense(x)
            if residual is not None:
                residual = self._dense(residual)
        elif top == bottom:  # a band with no edge row, or both: made dense here (F.pad's
            x = self._dense(x)  # output, where the rows are padded, is dense already)
        return dispatch.conv2d(x, w, b, fused=conv.fused, padding=(side, side, top, bottom),
                               residual=residual)  # fmt: skip

    def _down_conv(self, x, conv: Conv, bottom: int):
        w, b = self._w(conv.weight), self._w(conv.bias)
        if conv.fused:
            x = self._dense(x)
        return dispatch.pad_conv2d(x, w, b, fused=conv.fused, padding=(0, 1, 0, bottom))

    def _gn(self, x, norm: Norm, slot: _Slot, silu: bool):
        from .kernels import group_norm_band as gnb

        fused = norm.fused and _kernel_fits(x)
        if self.meta:  # what the kernel returns; the reference also holds an fp32 copy
            if fused:
                return gnb.empty_like_format(x)
            y = torch.empty_like(x)
            acc = 8 if x.dtype == torch.float64 else 4
            self._spike(x.numel() * acc if acc != x.element_size() else 0)
            return y
        if slot.rstd is None:
            slot.rstd = torch.rsqrt(slot.m2 / slot.count + norm.eps)
        if fused:
            return gnb.group_norm_band_apply(x, slot.mean, slot.rstd, norm.weight, norm.bias,
                                             silu=silu)  # fmt: skip
        return gnb.group_norm_band_apply_reference(x, slot.mean, slot.rstd, self._w(norm.weight),
                                                   self._w(norm.bias), silu=silu)  # fmt: skip

    def _acc(self, slot: _Slot | None, band) -> None:
        """Merge the statistics of ``band`` into ``slot`` (Chan)."""
        if slot is None:
            return
        from .kernels import group_norm_band as gnb

        fused = slot.fused and _kernel_fits(band)
        if self.meta:  # the kernel's partials: a few KB; the reference: an fp32 copy of band
            acc = 8 if band.dtype == torch.float64 else 4
            if not fused and acc != band.element_size():
                self._spike(band.numel() * acc)
            return
        stats = gnb.group_norm_band_stats if fused else gnb.group_norm_band_stats_reference
        mean, m2, count = stats(band, slot.groups)
        slot.mean, slot.m2, slot.count = gnb.merge_stats(slot.mean, slot.m2, slot.count,
                                                         mean, m2, count)  # fmt: skip

    def _attention(self, q, k, v, st: Attention):
        """(N, heads, l, d) queries against all keys and values."""
        return dispatch.attention(q.contiguous() if st.fused else q, k, v, scale=st.scale,
                                  fused=st.fused)  # fmt: skip

    # ------------------------------------------------------------------- sources
    def _up_rows(self, v: _Virtual, a: int, b: int):
        """Rows [a, b) of the upsampled tensor ``up(y)``."""
        up, hy = v.up, v.y.h
        ya, yb = max(0, (a - 1) // 2), min(hy, b // 2 + 1)
        y = self._dense(self.mv.read(v.y, ya, yb))
        if up.folded is not None:  # the model's transposed conv: rows [2 ya, 2 yb), cropped
            full = F.conv_transpose2d(y, self._w(up.folded), self._w(up.bias), stride=2, padding=1)
            del y
            return full[:, :, a - 2 * ya : b - 2 * ya]
        u = F.interpolate(y, scale_factor=2.0, mode="nearest")  # rows [2 ya, 2 yb)
        del y
        ua, ub, top, bottom = _pads(a, b, 2 * hy)
        return self._conv(u[:, :, ua - 2 * ya : ub - 2 * ya], Conv(up.weight, up.bias, False),
                          top, bottom)  # fmt: skip

    def _x_rows(self, src, a: int, b: int):
        if isinstance(src, _Virtual):
            return self._up_rows(src, a, b)
        return self.mv.read(src, a, b)

    def _prefetch(self, src, a, b) -> None:
        if isinstance(src, _Virtual):
            hy = src.y.h
            self.mv.prefetch(src.y, max(0, (a - 1) // 2), min(hy, b // 2 + 1))
        elif isinstance(src, _Buf):
            self.mv.prefetch(src, a, b)

    def _bands(self, bands, need):
        """The bands of a pass, the next band's rows (``need(r0, r1)``: (source, a, b)
        triples) prefetched first when offloading."""
        for k, (r0, r1) in enumerate(bands):
            self.mv.tick()
            if self.mv.offload and k + 1 < len(bands):
                for src, a, b in need(*bands[k + 1]):
                    self._prefetch(src, a, b)
            yield r0, r1

    # ---------------------------------------------------------------------- run
    def alloc(self, buf: _Buf | None) -> None:
        if buf is None or buf.tensor is not None:
            return
        n = self.prog.n
        if buf.device_only:  # attention K, V: (N, heads, L, d)
            heads = buf.heads
            buf.tensor = torch.empty((n, heads, buf.h * buf.w, buf.c // heads),
                                     dtype=self.dtype, device=self.device)  # fmt: skip
            return
        shape = (n, buf.c, buf.h, buf.w)
        buf.tensor = self.mv.alloc(buf, shape, self.dtype, self.fmt)

    def run(self, x_in: torch.Tensor) -> torch.Tensor:
        prog = self.prog
        self.input = x_in
        try:
            for i, p in enumerate(prog.passes):
                for b in (p.out, p.extra, p.k, p.v):
                    self.alloc(b)
                if p.kind == "out":
                    shape = (prog.n, prog.out_c, *prog.out_hw)
                    self.result = torch.empty(shape, dtype=self.dtype, device=self.device,
                                              memory_format=self.fmt)  # fmt: skip
                getattr(self, "_" + p.kind)(p, band_list(p.h, self.rows[i]))
                self.mv.drain()
                for b in prog.bufs:
                    if b.last == i:
                        b.tensor = None
        except BaseException as exc:
            # Clean up first and keep the original exception: a caller that catches an
            # out-of-memory error and retries with a smaller budget must get the memory
            # back (the result, the stored tensors, and what the bands' frames hold through
            # the traceback), and a sticky CUDA error that the drain raises again must
            # neither replace the original nor skip the release.
            self._cleanup()
            self.result = None
            traceback.clear_frames(exc.__traceback__.tb_next)
            for step in (self.mv.drain, self.mv.release):
                try:
                    step()
                except Exception as later:  # noqa: BLE001 - noted on the original
                    if hasattr(exc, "add_note"):  # Python >= 3.11
                        exc.add_note(f"(and while cleaning up after it: {later!r})")
            raise
        result, self.result = self.result, None
        self._cleanup()
        self.mv.release()  # drains the copies first
        return result

    def _cleanup(self) -> None:
        for b in self.prog.bufs:
            b.tensor = None
        for slot in self.prog.slots:
            slot.clear()
        self.input = None

    def _conv_in(self, p: _Pass, bands) -> None:
        st, x_in = p.step, self.input
        for r0, r1 in self._bands(bands, lambda r0, r1: []):
            a, b, top, bottom = _pads(r0, r1, p.h)
            y = self._conv(x_in[:, :, a:b], st.conv, top, bottom)
            self._acc(p.stats_out, y)
            self.mv.write(p.out, r0, y)
            del y

    def _res_a(self, p: _Pass, bands) -> None:
        st = p.step

        def need(r0, r1):
            return [(p.src, r0, r1)]

        for r0, r1 in self._bands(bands, need):
            x = self._x_rows(p.src, r0, r1)
            self._acc(p.stats_out, x)
            if not p.materialize:  # the block's 1x1 shortcut, into its output buffer
                x = self._conv(x.contiguous(memory_format=self.fmt), st.shortcut, 0, 0)
            self.mv.write(p.out, r0, x)  # materialized: x itself, the block's output buffer
            del x

    def _res_b(self, p: _Pass, bands) -> None:
        st = p.step

        def need(r0, r1):
            a, b, _, _ = _pads(r0, r1, p.h)
            return [(p.src, a, b)] + ([(p.src, r0, r1)] if p.extra is not None else [])

        for r0, r1 in self._bands(bands, need):
            a, b, top, bottom = _pads(r0, r1, p.h)
            x = self._x_rows(p.src, a, b)
            g = self._gn(x, st.norm1, p.stats_in, silu=True)
            del x
            h = self._conv(g, st.conv1, top, bottom)
            del g
            self._acc(p.stats_out, h)
            self.mv.write(p.out, r0, h)
            del h
            if p.extra is not None:  # stored x with a 1x1 shortcut: into the block output
                xs = self._x_rows(p.src, r0, r1)
                s = self._conv(xs, st.shortcut, 0, 0)
                del xs
                self.mv.write(p.extra, r0, s)
                del s

    def _res_c(self, p: _Pass, bands) -> None:
        st = p.step

        def need(r0, r1):
            a, b, _, _ = _pads(r0, r1, p.h)
            return [(p.src, a, b), (p.res, r0, r1)]

        for r0, r1 in self._bands(bands, need):
            a, b, top, bottom = _pads(r0, r1, p.h)
            hb = self.mv.read(p.src, a, b)
            g = self._gn(hb, st.norm2, p.stats_in, silu=True)
            del hb
            res = self.mv.read(p.res, r0, r1)
            o = self._conv(g, st.conv2, top, bottom, residual=res)
            del g, res
            self._acc(p.stats_out, o)
            self.mv.write(p.out, r0, o)
            del o

    @staticmethod
    def _tokens(g):
        n, c, r, w = g.shape
        return g.permute(0, 2, 3, 1).reshape(n, r * w, c)

    def _attn_kv(self, p: _Pass, bands) -> None:
        st = p.step
        c, hd = st.channels, st.heads

        def need(r0, r1):
            return [(p.src, r0, r1)]

        for r0, r1 in self._bands(bands, need):
            x = self.mv.read(p.src, r0, r1)
            t = self._tokens(self._gn(x, st.norm, p.stats_in, silu=False))
            del x
            n, l0, l1 = t.shape[0], r0 * p.w, r1 * p.w
            for dst, w, b in ((p.k, st.wk, st.bk), (p.v, st.wv, st.bv)):
                kv = F.linear(t, self._w(w), self._w(b))  # (N, l, C)
                dst.tensor[:, :, l0:l1].transpose(1, 2).copy_(kv.view(n, l1 - l0, hd, c // hd))
                del kv
            del t

    def _attn_qo(self, p: _Pass, bands) -> None:
        st = p.step
        c, hd = st.channels, st.heads
        k, v = p.k.tensor, p.v.tensor

        def need(r0, r1):
            return [(p.src, r0, r1)]

        for r0, r1 in self._bands(bands, need):
            x = self.mv.read(p.src, r0, r1)
            n, _, r, w = x.shape
            t = self._tokens(self._gn(x, st.norm, p.stats_in, silu=False))
            q = F.linear(t, self._w(st.wq), self._w(st.bq))  # (N, l, C)
            del t
            o = self._attention(q.view(n, r * w, hd, c // hd).transpose(1, 2), k, v, st)
            del q
            o = o.transpose(1, 2).reshape(n * r * w, c)
            res = x.permute(0, 2, 3, 1).reshape(n * r * w, c)
            wo, bo = self._w(st.wo), self._w(st.bo)
            if st.fused and st.residual and st.rescale == 1.0 and bo is not None:
                y = torch.addmm(res + bo, o, wo.t())  # as sdvae's fused block does
            else:
                y = F.linear(o, wo, bo)
                if st.residual:
                    y = y + res
                if st.rescale != 1.0:
                    y = y / st.rescale
            del o, res, x
            y = y.view(n, r, w, c).permute(0, 3, 1, 2)
            self._acc(p.stats_out, y)
            self.mv.write(p.out, r0, y)
            del y

    def _down(self, p: _Pass, bands) -> None:
        st, hin = p.step, p.src.h

        def need(r0, r1):
            return [(p.src, 2 * r0, min(2 * r1 + 1, hin))]

        for r0, r1 in self._bands(bands, need):
            a, b = 2 * r0, min(2 * r1 + 1, hin)
            x = self.mv.read(p.src, a, b)
            y = self._down_conv(x, st.conv, 2 * r1 + 1 - b)
            del x
            self._acc(p.stats_out, y)
            self.mv.write(p.out, r0, y)
            del y

    def _out(self, p: _Pass, bands) -> None:
        st = p.step

        def need(r0, r1):
            a, b, _, _ = _pads(r0, r1, p.h)
            return [(p.src, a, b)]

        for r0, r1 in self._bands(bands, need):
            a, b, top, bottom = _pads(r0, r1, p.h)
            x = self.mv.read(p.src, a, b)
            g = self._gn(x, st.norm, p.stats_in, silu=True)
            del x
            y = self._conv(g, st.conv, top, bottom)
            del g
            self.result[:, :, r0:r1].copy_(y)
            del y


def band_list(height: int, rows) -> list[tuple[int, int]]:
    """Bands ``[r0, r1)`` covering ``height`` rows: ``rows`` per band (an int), or a sequence
    of band heights used in turn (tests: band edges at every offset)."""
    seq = [rows] if isinstance(rows, int) else list(rows)
    if not seq or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in seq):
        raise ValueError(f"band rows must be positive ints, got {rows!r}")
    out, r0, i = [], 0, 0
    while r0 < height:
        r1 = min(height, r0 + seq[i % len(seq)])
        out.append((r0, r1))
        r0, i = r1, i + 1
    return out


def memory_format_of(part, x: torch.Tensor) -> torch.memory_format:
    """The layout the stored tensors take: the model's (channels_last after ``optimize`` on
    CUDA) or the input's."""
    w = part.conv_in.weight
    for t in (w, x):
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            return torch.channels_last
    return torch.contiguous_format


def check_encoder_input(h: int, w: int, downsamplings: int, name: str = "images") -> None:
    """ValueError unless an ``h`` x ``w`` input leaves every level of an encoder with
    ``downsamplings`` stride-2 downsamplings at least one row and column: each halves (and
    floors) the sides, and a side of one pixel has nothing left for the next."""
    need = 2**downsamplings
    if h < need or w < need:
        raise ValueError(
            f"{name} of {h}x{w} (HxW) are too small for this encoder: its {downsamplings} "
            f"stride-2 downsamplings need each side to be at least {need} pixels"
        )


def program(part, shape, dtype: torch.dtype, *, meta: bool = False) -> _Program:
    """The passes and stored tensors of running ``part`` on an input of ``shape`` in
    ``dtype``; ``meta``: with shape-only weights (the planner)."""
    low = lower(part, dtype, meta=meta)
    kind, steps, cin = low.kind, low.steps, low.cin
    n, c, h, w = shape
    if c != cin:
        raise ValueError(f"the input must have {cin} channels, got shape {tuple(shape)}")
    if kind == "encoder":
        check_encoder_input(h, w, sum(isinstance(s, Downsample) for s in steps))
    elem = torch.empty((), dtype=dtype).element_size()
    return _Program(kind, steps, n, h, w, cin, elem)


def _hooked(part) -> list:
    """The modules of ``part`` that carry an accelerate hook (``_hf_hook``)."""
    return [m for m in part.modules() if getattr(m, "_hf_hook", None) is not None]


def hooked_weight_bytes(part, device, dtype: torch.dtype) -> int:
    """Bytes of the weights that ``part``'s accelerate hooks bring to ``device`` for a
    streamed call (they are elsewhere between calls: on the meta device under sequential CPU
    offload); the streamed path holds them all for the call."""
    device = torch.device(device)
    e = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel() * e
        for m in _hooked(part)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
        if t.device != device
    )


def _check_weights(prog: _Program, x: torch.Tensor) -> None:
    """ValueError when a weight the steps read is on the meta device (``F.conv2d`` of a real
    input and a meta weight returns an uninitialised tensor: garbage, silently) or on another
    device than ``x``."""
    for t in weights(prog.steps):
        if t.is_meta:
            raise ValueError(
                "the model's weights are on the meta device (built empty and never loaded, or "
                "offloaded with no accelerate hook to bring them back): load them before "
                "calling it"
            )
        if t.device != x.device:
            raise ValueError(f"the model's weights are on {t.device} but the input is on "
                             f"{x.device}")  # fmt: skip


def run(part, x: torch.Tensor, *, rows, offload: str | None = None, prog=None) -> torch.Tensor:
    """Run ``part`` (an sdvae or diffusers Encoder/Decoder) on ``x`` streamed: ``rows`` is
    one band height per pass (``MemoryPlan.passes[i].rows``), or an int / a sequence of band
    heights for every pass. Inference only: with grad mode on and an input or weight that
    requires grad it raises (the bands are written in place).

    The engine reads weights without calling their modules, so the accelerate hooks of the
    modules that have one (``cpu_offload``, diffusers' sequential CPU offload) run around the
    whole call: their weights are on the device while it runs, offloaded again after."""
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in part.parameters())
    ):
        raise ValueError(
            "the streamed path (max_memory/offload) is an inference call: call it under "
            "torch.no_grad() or torch.inference_mode()"
        )
    with weights_of(*_hooked(part)):
        if prog is None:
            prog = program(part, tuple(x.shape), x.dtype)
        _check_weights(prog, x)
        if not isinstance(rows, list) or len(rows) != len(prog.passes):
            rows = [rows] * len(prog.passes)
        fmt = memory_format_of(part, x)
        runner = _Runner(prog, rows, x.device, x.dtype, fmt, offload == "cpu")
        return runner.run(x)


# ----------------------------------------------------------------- band costs (planner)
def _meta_state(prog: _Program, i: int, runner: _Runner) -> None:
    """Meta tensors for everything pass ``i`` reads and writes, statistics included."""
    p = prog.passes[i]
    bufs = [p.out, p.extra, p.res, p.k, p.v]
    src = p.src.y if isinstance(p.src, _Virtual) else p.src
    bufs.append(src if isinstance(src, _Buf) else None)
    for b in bufs:
        runner.alloc(b)
    for slot in (p.stats_in, p.stats_out):
        if slot is not None:
            shape = (prog.n, slot.groups)
            acc = torch.float64 if runner.dtype == torch.float64 else torch.float32
            slot.mean = torch.empty(shape, dtype=acc, device="meta")
            slot.m2 = torch.empty(shape, dtype=acc, device="meta")
            slot.count = 1
            slot.rstd = None
    if p.kind == "conv_in":
        runner.input = torch.empty(prog.in_shape, dtype=runner.dtype, device="meta",
                                   memory_format=runner.fmt)  # fmt: skip
    if p.kind == "out":
        oh, ow = prog.out_hw
        runner.result = torch.empty((prog.n, prog.out_c, oh, ow), dtype=runner.dtype,
                                    device="meta", memory_format=runner.fmt)  # fmt: skip


def band_peak(prog: _Program, i: int, bands, *, dtype, fmt, offload: bool, real) -> int:
    """Bytes the given consecutive bands of pass ``i`` allocate at most (stored tensors and
    weights excluded), measured by running the engine's own code for them on the meta
    device."""
    from .memtrack import TensorMemory

    runner = _Runner(prog, None, torch.device("meta"), dtype, fmt, offload, real=real)
    p = prog.passes[i]
    try:
        _meta_state(prog, i, runner)
        for t in weights([p.step, p.src.up if isinstance(p.src, _Virtual) else None]):
            runner._w(t)
        with TensorMemory("meta", collect=False) as tracker, dispatch.metered(tracker, real):
            runner.tracker = tracker
            getattr(runner, "_" + p.kind)(p, bands)
            runner.mv.drain()
        return tracker.peak
    finally:
        for b in prog.bufs:
            b.tensor = None
        for slot in prog.slots:
            slot.clear()


def band_checks(height: int, rows: int, offload: bool) -> list[list[tuple[int, int]]]:
    """Runs of consecutive bands whose costs bound every band of a pass: the first band, two
    in the middle (both parities of their first row) and the last, each after the band
    before it. Offloaded, each comes with the two bands before it (whose written rows are
    still held) and the one after it (whose rows are prefetched)."""
    bands = band_list(height, rows)
    k = len(bands)
    picks = sorted({0, k // 2, min(k // 2 + 1, k - 1), k - 1})
    if not offload:  # with the band before it: nothing of it may outlive it
        return [bands[max(j - 1, 0) : j + 1] for j in picks]
    return [bands[max(j - 2, 0) : j + 2] for j in picks]


def _sig(obj):
    """A hashable structural description (shapes, flags; no names, no values)."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype)
    if isinstance(obj, (list, tuple)):
        return tuple(_sig(o) for o in obj)
    if isinstance(obj, _Buf):
        return ("B", obj.c, obj.h, obj.w, obj.device_only, obj.heads)
    if isinstance(obj, _Slot):
        return ("S", obj.groups, obj.fused)
    if dataclasses.is_dataclass(obj):
        return (type(obj).__name__,) + tuple(
            _sig(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name != "name" and f.repr  # not the modules an Upsample record points to
        )
    return obj


_COSTS: dict = {}


def pass_cost(prog: _Program, i: int, rows: int, **kw) -> int:
    """The most bytes one band of ``rows`` rows of pass ``i`` allocates, over every band of the
    pass (stored tensors excluded); cached by the pass's structure and the statistics path of
    what it writes."""
    p = prog.passes[i]  # its statistics slots' sig holds the statistics path
    key = (_sig(p), prog.n, rows, tuple(sorted((k, str(v)) for k, v in kw.items())))
    got = _COSTS.get(key)
    if got is None:
        if len(_COSTS) > 65536:
            _COSTS.clear()
        checks = band_checks(p.h, rows, kw["offload"])
        got = _COSTS[key] = max(band_peak(prog, i, bands, **kw) for bands in checks)
    return got
