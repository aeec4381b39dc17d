"""Fused GroupNorm (+ optional SiLU, + optional fused input bias and residual) in Triton, for
NCHW and channels_last tensors.

What it computes
----------------
For ``x`` of shape ``(N, C, *spatial)`` (1 to 3 spatial dims, ``S`` = their product), ``G``
groups of ``Cg = C // G`` channels:

    s = x + input_bias[c] + residual          (each term optional; formed in fp32 as
                                               (x + residual) + input_bias everywhere)
    y = silu?((s - mean[n, g]) * rstd[n, g] * weight[c] + bias[c])

with the statistics of ``s`` over the ``Cg * S`` values of each ``(n, g)`` and
``rstd = 1 / sqrt(var + eps)`` (biased variance): exactly ``F.group_norm(s)`` followed by
``F.silu``. ``input_bias`` is the producing conv's bias (so the conv can run without it),
``residual`` a tensor of ``x``'s shape in either layout (copied into x's layout first when
they differ). With ``return_sum=True`` the kernel
also writes ``s`` (once, in ``x``'s dtype and layout) for a later residual add. fp32, fp16 and
bf16 ``x``; weight/bias/input_bias in ``x``'s dtype or fp32; residual in ``x``'s dtype;
statistics and arithmetic in fp32 (``s`` itself is formed in fp32 and only rounded when it is
written); outputs in ``x``'s dtype and memory format.

Numerics
--------
Variance is never ``E[s^2] - E[s]^2``. Every value is first shifted by ``K`` = ``s`` at the
group's first element (channel ``g * Cg``, pixel 0): for data with mean 1e4 and std 1 the fp32
mean of ``s`` itself is only known to ~5e-4, which would already cost 5e-4 relative error in
``s - mean``; ``s - K`` is exact (Sterbenz) and its mean is O(std), known to fp32 precision.
On the shifted values:

* one launch: the whole group sits in registers; mean, then the centred sum of squares
  (an exact second pass over registers);
* two passes: every lane of a statistics tile runs Welford's update over the tiles its
  program walks (all lanes share the count, so the update costs one reciprocal per tile, not
  per value), lanes are merged per channel with Chan et al.'s pairwise formula at the end of
  the program, and a tiny finalize kernel merges the ``Cg x chunks`` per-channel partials of
  each group (Chan again).

The apply step is ``(s - K) * a + d`` with ``a = rstd * w[c]`` and ``d = b[c] - mean * a``.

Launch rule (no autotuning; ``plan`` implements it, ``describe_plan`` prints it, the bench
logs it for every shape)
-------------------------------------------------------------------------------------------
Let ``L = Cg * S`` and ``P = next_pow2(L)``.

* **one launch** (``_gn_single_kernel``) when ``P <= SINGLE_MAX`` (16384 values) and one
  sample has fewer than 2^31 values: grid ``N * G``, one program per group, the group loaded
  once into registers as a flat block of ``P`` values (NCHW: the group's contiguous span;
  channels_last: ``S`` runs of ``Cg`` channels; at least 64 values),
  ``num_warps = clamp(P // 512, 2, 16)`` (at most 32 values per thread). ``x`` is read once
  and ``y`` written once. Per-value channel indices cost an integer division here, and
  weight/bias/input_bias are gathered per value (from L1): fine for the small tensors this
  path is for.
* **two passes** otherwise. Tiles are ``TILE`` = 4096 values of one sample:
  ``[BLOCK_C channels, BLOCK_S pixels]`` with the contiguous axis full first —
  NCHW: ``BLOCK_S = clamp(next_pow2(S), 8, TILE)``, channels_last:
  ``BLOCK_C = clamp(next_pow2(C), 8, TILE)``, the other side ``TILE // that``; 8 warps
  (16 values per thread: two 16-byte vectors in fp16/bf16, four in fp32).

  1. ``_gn_stats_kernel``: grid ``N * cblocks * chunks``; the ``sblocks = cdiv(S, BLOCK_S)``
     pixel tiles of each (sample, channel block) are cut into ``chunks`` runs of
     ``tiles_per_chunk`` tiles. With ``wave = per_sm * SMs`` and ``rows = N * cblocks``:
     ``chunks = cdiv(wave, rows)`` when ``rows <= wave`` (at least one full wave, and fewer
     than ``rows`` programs past it), else ``cdiv(STATS_MIN_WAVES * wave, rows)`` (4 waves
     or more, so that the last, partly filled one is a small part of the time); clamped to
     ``[1, sblocks]`` and trimmed so no chunk is empty; ``describe_plan`` prints the
     programs and the waves they make. The ceiling matters for NCHW, where rows are
     channels: a floor gave C = 256 one chunk, 256 programs for 132 SMs (0.65 of a wave of
     396), and C = 128 with an input bias 2 chunks; the ceiling gives 512 and 384. Channels
     last has one row per sample (``cblocks`` = 1 up to 4096 channels), so there the two
     roundings agree for batch 1. ``per_sm`` =
     ``STATS_PROGRAMS_PER_SM`` = 3 for plain fp16/bf16, ``STATS_PROGRAMS_PER_SM_WIDE`` = 2
     for fp32 or with an input_bias or a residual: what fits at the registers ptxas gives
     the stats kernel for sm_80/sm_90 on the VAE's tiles: 64-80 per thread for plain
     fp16/bf16 (3 programs of 256 threads fit: <= 85), 64-98 with an input_bias, 79-115
     with a residual, 70-102 in fp32, up to 128 in fp32 with a residual (2 fit: <= 128).
     NCHW tiles take 53-64 registers in plain fp16 on sm_90 (4 programs per SM fit), so
     C = 256's 512 programs still run as one wave there (528 slots on 132 SMs).
     Each iteration loads two tiles before using either (32 KB in flight per SM in fp16).
     Writes per-(sample, channel, chunk) (mean, M2) of ``s - K``: 8 bytes per channel per
     chunk.
  2. ``_gn_finalize_kernel``: grid ``N * G``; merges each group's partials, writes per-(sample,
     channel) ``K, a, d`` (12 bytes per channel).
  3. ``_gn_apply_kernel``: grid ``N * cblocks * chunks * tiles_per_chunk``, one tile per
     program, streaming; programs are numbered so that the first wave takes the *last* tile of
     every chunk, then the one before...: the tiles the statistics pass read last (the ones
     still in L2 when the tensor is larger than L2) are re-read first. Writes ``y`` (and
     ``s``).

  ``x`` is read twice (the second read from L2 while the tensor fits there, ~50 MB on
  H100/H200) and ``y`` written once; the finalize kernel touches a few KB.

The NCHW and channels_last paths are the same kernels: only which tile axis is contiguous
differs (a constexpr), and Triton's coalescing puts the 16-byte vectors along it. The
vectors need the JIT's "divisible by 16" specialisation of ``S`` (NCHW) or ``C``
(channels_last), true for the VAE's shapes; other sizes still run, with narrower accesses.
A residual in the other layout is first copied into x's layout (the model never mixes
layouts). Read through its own strides instead, it was not coalesced, and the layout
conversion Triton inserted cost up to ~240 registers and 16 KB of shared memory in the stats
kernel, with register spills in the stats and one-launch kernels.

Scratch per two-pass call: ``2 * N * C * chunks`` + ``3 * N * C`` fp32 values (under 0.5 MB
at the VAE's shapes), from PyTorch's caching allocator.

Offsets: per-program bases are int64 (tensors of 2^31 values and more), and so is every
product that can pass 2^31, the group shift's element included (the group's first channel
enters the int64 base, not the in-tile offset: ``gc * S`` passes 2^31 at (1, 256, 4096^2) in
NCHW). The per-channel scratch indices ``n * C + c`` are int32 (int64 there cost spills on
sm_80): with ``N * C >= 2^31`` the reference runs. Offsets inside a tile are int32: an NCHW
tile has ``BLOCK_C > 1`` only when ``S < BLOCK_S``, so it spans at most
``BLOCK_C * S <= TILE`` values (channels_last likewise with ``C``); the one-launch path only
runs when a sample has fewer than 2^31 values. Pixel indices are int32: with
``S >= 2^31 - 4 * TILE`` the reference runs, and the apply kernel clamps a padding slot's
tile index to the tile just past the tensor (an unclamped one can pass 2^31 by up to
``tiles_per_chunk`` tiles, wrap negative and pass the mask).

Under ``TRITON_INTERPRET=1`` (tests) the rule is the same with ``INTERPRET_SINGLE_MAX`` = 1024,
``INTERPRET_TILE`` = 64, ``INTERPRET_SMS`` = 4 and a finalize block of 16, so small shapes
take both paths, several tiles and several chunks.

References: Wu & He, "Group Normalization" (2018); Welford (1962); Chan, Golub & LeVeque,
"Algorithms for computing the sample variance" (1979); the Triton layer-norm tutorial for the
split-reduction structure.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except ImportError as _exc:  # CPU-only installs still get the reference path
    triton = None
    tl = None
    TRITON_ERROR = f"triton is not importable ({_exc})"

__all__ = ["describe_plan", "group_norm", "group_norm_reference", "not_supported_reasons", "plan"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The launch rule's constants (module header). GPU values, then the interpreter's (tests):
#: there is no device to ask for an SM count, and small tiles make tiny shapes take several
#: tiles and chunks while the numpy emulation stays quick.
SINGLE_MAX = 16384
TILE = 4096
NUM_WARPS = 8
MIN_BLOCK = 8
STATS_PROGRAMS_PER_SM = 3
STATS_PROGRAMS_PER_SM_WIDE = 2
STATS_MIN_WAVES = 4
FINALIZE_BLOCK = 1024
FINALIZE_WARPS = 4
INTERPRET_SMS = 4
INTERPRET_SINGLE_MAX = 1024
INTERPRET_TILE = 64
INTERPRET_FINALIZE_BLOCK = 16


# --------------------------------------------------------------------------------- reference
def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))


def group_norm_reference(
    x,
    num_groups,
    weight=None,
    bias=None,
    eps=1e-6,
    *,
    silu=False,
    input_bias=None,
    residual=None,
    return_sum=False,
):
    """Eager ``s = x + input_bias[c] + residual``, ``F.group_norm(s)``, optional ``F.silu``, in
    ``x``'s dtype (float64 when given float64); 1-D tensors are cast to ``x``'s dtype first.
    Returns ``y``, or ``(y, s)`` when ``return_sum``."""
    s = x
    if input_bias is not None:
        s = s + _channel_view(input_bias, x)
    if residual is not None:
        s = s + residual.to(x.dtype)
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = F.group_norm(s, num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return (y, s) if return_sum else y


# ----------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _offsets(n, c0, s0, dc, ds, C, S, CL: tl.constexpr):
        """int64 base of element (n, c0, s0) and int32 in-tile offsets of channels ``c0 + dc``
        and pixels ``s0 + ds`` in a dense NCHW or channels_last tensor."""
        if CL:
            base = (n.to(tl.int64) * S + s0) * C + c0
            rel = ds * C + dc
        else:
            base = (n.to(tl.int64) * C + c0) * S + s0
            rel = dc * S + ds
        return base, rel

    @triton.jit
    def _load_sum(
        x_ptr,  # (N, C, S) input, NCHW or channels_last per CL
        r_ptr,  # (N, C, S) residual in x's layout (unused unless HAS_RES)
        ib,  # fp32 input bias per value, broadcasting like dc (unused unless HAS_IB)
        n,
        c0,
        s0,
        dc,  # channel offsets from c0 (any shape broadcasting with ds)
        ds,  # pixel offsets from s0
        mask,
        C,
        S,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
    ):
        """``s = (x + residual) + input_bias[c]`` in fp32 (always in this order, so that every
        kernel forms bit-identical values), and the int64 base / int32 offsets of x."""
        base, rel = _offsets(n, c0, s0, dc, ds, C, S, CL)
        v = tl.load(x_ptr + base + rel, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v = v + tl.load(r_ptr + base + rel, mask=mask, other=0.0).to(tl.float32)
        if HAS_IB:
            v = v + ib
        return v, base, rel

    @triton.jit
    def _channel_load(ptr, c, mask, HAS: tl.constexpr):
        """fp32 ``ptr[c]`` (0 where masked, or when the tensor is absent)."""
        v = c * 0.0
        if HAS:
            v = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _group_shift(
        x_ptr,
        ib_ptr,
        r_ptr,
        n,
        gc,  # first channel of the group: a scalar or a 1-D tensor
        mask,
        C,
        S,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
    ):
        """K = s at (n, gc, pixel 0), fp32, bit-identical to what ``_load_sum`` forms there.
        ``gc`` goes into the int64 base (as the tile's first channel), never into the int32
        in-tile offset: ``gc * S`` passes 2^31 at (1, 256, 4096^2) in NCHW."""
        zero = gc * 0
        ib = _channel_load(ib_ptr, gc, mask, HAS_IB)
        v, _, _ = _load_sum(
            x_ptr, r_ptr, ib, n, gc, zero, zero, zero, mask, C, S, CL, HAS_IB, HAS_RES
        )
        return v

    @triton.jit
    def silu_tl(y):
        # exp's argument capped at 80: no overflow (masked lanes can hold anything); for
        # y < -80 the result is y * 1.8e-35 instead of about y * e^y: both negligible
        return y / (1.0 + tl.exp(tl.minimum(-y, 80.0)))

    @triton.jit
    def _gn_single_kernel(
        x_ptr,  # (N, C, S) input
        ib_ptr,  # (C,) input bias or dummy
        r_ptr,  # (N, C, S) residual or dummy
        w_ptr,  # (C,) weight or dummy
        b_ptr,  # (C,) bias or dummy
        y_ptr,  # (N, C, S) output, x's layout and dtype
        sum_ptr,  # (N, C, S) s = x + input_bias + residual, x's layout and dtype, or dummy
        C,
        S,
        Cg,
        G,
        eps,
        BLOCK: tl.constexpr,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
        WRITE_SUM: tl.constexpr,
    ):
        """Grid (N * G,): one program holds one whole group (Cg * S <= BLOCK values) in
        registers: read once, exact centred statistics, write once."""
        pid = tl.program_id(0)
        n = pid // G
        c0 = (pid % G) * Cg
        e = tl.arange(0, BLOCK)
        L = Cg * S
        mask = e < L
        if CL:  # the group is S runs of Cg channels
            ds = e // Cg
            dc = e - ds * Cg
        else:  # the group is one contiguous span of Cg rows of S pixels
            dc = e // S
            ds = e - dc * S
        zero = pid * 0
        ib = _channel_load(ib_ptr, c0 + dc, mask, HAS_IB)  # a gather per value
        v, base, rel = _load_sum(
            x_ptr, r_ptr, ib, n, c0, zero, dc, ds, mask, C, S, CL, HAS_IB, HAS_RES
        )
        k = tl.sum(tl.where(e == 0, v, 0.0), axis=0)  # s at (n, c0, 0): exact
        count = L.to(tl.float32)
        d = tl.where(mask, v - k, 0.0)
        mean = tl.sum(d, axis=0) / count
        d = tl.where(mask, d - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / count + eps)
        a = rstd
        if HAS_W:
            a = a * tl.load(w_ptr + c0 + dc, mask=mask, other=0.0).to(tl.float32)
        y = d * a
        if HAS_B:
            y = y + tl.load(b_ptr + c0 + dc, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = silu_tl(y)
        tl.store(y_ptr + base + rel, y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_SUM:
            tl.store(sum_ptr + base + rel, v.to(sum_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_stats_kernel(
        x_ptr,  # (N, C, S) input
        ib_ptr,  # (C,) input bias or dummy
        r_ptr,  # (N, C, S) residual or dummy
        part_ptr,  # (2, N, C, chunks) fp32: mean and M2 of s - K per channel and chunk
        N,
        C,
        S,
        Cg,
        cblocks,
        chunks,
        tiles_per_chunk,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
    ):
        """Grid (N * cblocks * chunks,): Welford per lane over one chunk's tiles, Chan merge of
        the lanes per channel, one (mean, M2) per channel."""
        pid = tl.program_id(0)
        chunk = pid % chunks
        rest = pid // chunks
        n = rest // cblocks
        c0 = (rest % cblocks) * BLOCK_C
        dc = tl.arange(0, BLOCK_C)[:, None]
        ds = tl.arange(0, BLOCK_S)[None, :]
        cmask = c0 + dc < C
        c = c0 + tl.arange(0, BLOCK_C)  # channels as a 1-D vector: one load per row
        gc = c // Cg * Cg  # the first channel of each channel's group
        k = _group_shift(x_ptr, ib_ptr, r_ptr, n, gc, c < C, C, S, CL, HAS_IB, HAS_RES)[:, None]
        ib = _channel_load(ib_ptr, c, c < C, HAS_IB)[:, None]
        t0 = chunk * tiles_per_chunk
        n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(S, BLOCK_S) - t0)
        mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        # Two tiles per iteration, both loads issued before either is used (twice the bytes in
        # flight per program). Only the tensor's last tile can be partial, and it is a
        # program's last update: a masked lane keeps delta = 0, so its mean and M2 stay those
        # of its valid values (and the second tile past a chunk's end is fully masked).
        for i in range(0, n_tiles, 2):
            s0 = (t0 + i) * BLOCK_S
            mask_a = cmask & (s0 + ds < S)
            # the chunk's end, as a tile-shaped mask: Triton 3.9's interpreter turns a block
            # bool & a scalar bool into int32, which tl.load then refuses as a mask
            mask_b = cmask & (s0 + BLOCK_S + ds < S) & (ds * 0 + i + 1 < n_tiles)
            va, _, _ = _load_sum(
                x_ptr, r_ptr, ib, n, c0, s0, dc, ds, mask_a, C, S,
                CL, HAS_IB, HAS_RES,
            )  # fmt: skip
            vb, _, _ = _load_sum(
                x_ptr, r_ptr, ib, n, c0, s0 + BLOCK_S, dc, ds, mask_b, C, S,
                CL, HAS_IB, HAS_RES,
            )  # fmt: skip
            d = va - k
            delta = tl.where(mask_a, d - mean, 0.0)
            mean += delta * (1.0 / (i + 1.0))
            m2 += delta * (d - mean)
            d = vb - k
            delta = tl.where(mask_b, d - mean, 0.0)
            mean += delta * (1.0 / (i + 2.0))
            m2 += delta * (d - mean)
        # lane counts: every iteration but the last is full
        s_last = (t0 + n_tiles - 1) * BLOCK_S
        lane_n = (n_tiles - 1 + (s_last + ds < S).to(tl.int32)).to(tl.float32)
        total = tl.sum(lane_n, axis=1)  # [1]: valid pixels of the chunk
        c_mean = tl.sum(lane_n * mean, axis=1) / total
        dev = mean - c_mean[:, None]
        c_m2 = tl.sum(m2 + lane_n * dev * dev, axis=1)
        idx = (n * C + c).to(tl.int64) * chunks + chunk
        tl.store(part_ptr + idx, c_mean, mask=c < C)
        tl.store(part_ptr + (N * C).to(tl.int64) * chunks + idx, c_m2, mask=c < C)

    @triton.jit
    def _gn_finalize_kernel(
        x_ptr,  # (N, C, S) input (for the shift K)
        ib_ptr,  # (C,) input bias or dummy
        r_ptr,  # (N, C, S) residual or dummy
        w_ptr,  # (C,) weight or dummy
        b_ptr,  # (C,) bias or dummy
        part_ptr,  # (2, N, C, chunks) fp32 from _gn_stats_kernel
        coef_ptr,  # (3, N, C) fp32 out: K, a, d per channel
        N,
        C,
        S,
        Cg,
        G,
        chunks,
        chunk_s,  # pixels per chunk (the last may hold fewer)
        eps,
        BLOCK: tl.constexpr,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
    ):
        """Grid (N * G,): Chan merge of one group's Cg * chunks partials; per-channel
        coefficients of the apply step."""
        pid = tl.program_id(0)
        n = pid // G
        g = pid % G
        n_part = Cg * chunks
        start = (n * C + g * Cg).to(tl.int64) * chunks
        m2_off = (N * C).to(tl.int64) * chunks
        mean = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
        m2 = mean
        count = mean
        for p0 in range(0, n_part, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            pm = p < n_part
            ch = p % chunks
            px = tl.minimum(S - ch * chunk_s, chunk_s)
            b_n = tl.where(pm, px, 0).to(tl.float32)
            p_mean = tl.load(part_ptr + start + p, mask=pm, other=0.0)
            p_m2 = tl.load(part_ptr + m2_off + start + p, mask=pm, other=0.0)
            b_count = tl.sum(b_n, axis=0)
            b_mean = tl.sum(b_n * p_mean, axis=0) / b_count
            dev = p_mean - b_mean
            b_m2 = tl.sum(p_m2 + b_n * dev * dev, axis=0)
            new_count = count + b_count
            delta = b_mean - mean
            mean = mean + delta * (b_count / new_count)
            m2 = m2 + b_m2 + delta * delta * (count * b_count / new_count)
            count = new_count
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        k = _group_shift(x_ptr, ib_ptr, r_ptr, n, g * Cg, True, C, S, CL, HAS_IB, HAS_RES)
        nc = (N * C).to(tl.int64)
        for j0 in range(0, Cg, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            jm = j < Cg
            c = g * Cg + j
            a = tl.zeros([BLOCK], dtype=tl.float32) + rstd
            if HAS_W:
                a = a * tl.load(w_ptr + c, mask=jm, other=0.0).to(tl.float32)
            d = -mean * a
            if HAS_B:
                d = d + tl.load(b_ptr + c, mask=jm, other=0.0).to(tl.float32)
            out = n * C + c
            tl.store(coef_ptr + out, tl.zeros([BLOCK], dtype=tl.float32) + k, mask=jm)
            tl.store(coef_ptr + nc + out, a, mask=jm)
            tl.store(coef_ptr + 2 * nc + out, d, mask=jm)

    @triton.jit
    def _gn_apply_kernel(
        x_ptr,  # (N, C, S) input
        ib_ptr,  # (C,) input bias or dummy
        r_ptr,  # (N, C, S) residual or dummy
        coef_ptr,  # (3, N, C) fp32 from _gn_finalize_kernel
        y_ptr,  # (N, C, S) output
        sum_ptr,  # (N, C, S) s, or dummy
        N,
        C,
        S,
        cblocks,
        chunks,
        tiles_per_chunk,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
        CL: tl.constexpr,
        HAS_IB: tl.constexpr,
        HAS_RES: tl.constexpr,
        SILU: tl.constexpr,
        WRITE_SUM: tl.constexpr,
    ):
        """Grid (N * cblocks * chunks * tiles_per_chunk,): one tile per program; the first
        N * cblocks * chunks programs take the last tile of every chunk, and so on backwards."""
        pid = tl.program_id(0)
        q_total = N * cblocks * chunks
        q = pid % q_total
        back = pid // q_total
        chunk = q % chunks
        rest = q // chunks
        n = rest // cblocks
        c0 = (rest % cblocks) * BLOCK_C
        # The few slots past a short last chunk are clamped to the tile just past the tensor
        # (s0 >= S: all lanes off). Unclamped, their s0 could pass 2^31 for S just under it,
        # wrap negative and pass the mask.
        tile = chunk * tiles_per_chunk + tiles_per_chunk - 1 - back
        s0 = tl.minimum(tile, tl.cdiv(S, BLOCK_S)) * BLOCK_S
        dc = tl.arange(0, BLOCK_C)[:, None]
        ds = tl.arange(0, BLOCK_S)[None, :]
        cmask = c0 + dc < C
        mask = cmask & (s0 + ds < S)
        # per-channel values as 1-D vectors: one load per tile row, not per value
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ib = _channel_load(ib_ptr, c, c_ok, HAS_IB)[:, None]
        v, base, rel = _load_sum(
            x_ptr, r_ptr, ib, n, c0, s0, dc, ds, mask, C, S, CL, HAS_IB, HAS_RES
        )
        # The a and d rows start N*C and 2*N*C values in: scalar int64 bases (2*N*C passes
        # 2^31 from N*C = 2^30); the per-lane index n*C + c stays int32 (N*C < 2^31).
        nc = (N * C).to(tl.int64)
        ci = n * C + c
        k = tl.load(coef_ptr + ci, mask=c_ok, other=0.0)[:, None]
        a = tl.load((coef_ptr + nc) + ci, mask=c_ok, other=0.0)[:, None]
        d = tl.load((coef_ptr + 2 * nc) + ci, mask=c_ok, other=0.0)[:, None]
        y = (v - k) * a + d
        if SILU:
            y = silu_tl(y)
        tl.store(y_ptr + base + rel, y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_SUM:
            tl.store(sum_ptr + base + rel, v.to(sum_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ host
def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(v, hi))


class Plan(NamedTuple):
    """What the launcher runs (see the module header for the rule).

    ``path`` is "single" (``_gn_single_kernel``, grid ``N * G``, flat block ``block``) or
    "two_pass" (stats / finalize / apply on ``[block_c, block_s]`` tiles)."""

    path: str
    num_warps: int
    block: int = 0
    block_c: int = 0
    block_s: int = 0
    cblocks: int = 0
    sblocks: int = 0
    chunks: int = 0
    tiles_per_chunk: int = 0
    finalize_block: int = 0
    wave: int = 0

    def grids(self, n: int, groups: int) -> dict[str, int]:
        """Programs per kernel launch."""
        if self.path == "single":
            return {"single": n * groups}
        q = n * self.cblocks * self.chunks
        return {"stats": q, "finalize": n * groups, "apply": q * self.tiles_per_chunk}


@functools.lru_cache(maxsize=1024)
def plan(
    n: int,
    c: int,
    s: int,
    groups: int,
    channels_last: bool,
    num_sms: int,
    *,
    itemsize: int = 2,
    fused_inputs: bool = False,
    interpret: bool = False,
    path: str | None = None,
    chunks: int | None = None,
) -> Plan:
    """The launch rule for one shape (``itemsize``: bytes per value of x; ``fused_inputs``:
    an input_bias or a residual is read too). ``path`` ("single" / "two_pass") and ``chunks``
    force a strategy / split (tests); ``interpret`` selects the interpreter's constants."""
    single_max = INTERPRET_SINGLE_MAX if interpret else SINGLE_MAX
    tile = INTERPRET_TILE if interpret else TILE
    group_p2 = _next_pow2((c // groups) * s)
    if path is None:
        path = "single" if group_p2 <= single_max and c * s < 2**31 else "two_pass"
    if path == "single":
        if c * s >= 2**31 or group_p2 > 4 * SINGLE_MAX:
            raise ValueError(f"the one-launch path cannot take groups of {(c // groups) * s}")
        block = max(group_p2, 64)
        return Plan("single", _clamp(block // 512, 2, 16), block=block)
    if path != "two_pass":
        raise ValueError(f"path must be 'single', 'two_pass' or None, got {path!r}")
    if channels_last:
        block_c = _clamp(_next_pow2(c), MIN_BLOCK, tile)
        block_s = tile // block_c
    else:
        block_s = _clamp(_next_pow2(s), MIN_BLOCK, tile)
        block_c = tile // block_s
    cblocks = -(-c // block_c)
    sblocks = -(-s // block_s)
    wide = itemsize > 2 or fused_inputs
    per_sm = STATS_PROGRAMS_PER_SM_WIDE if wide else STATS_PROGRAMS_PER_SM
    wave, rows = per_sm * num_sms, n * cblocks
    if chunks is None:
        # at least one full wave when the rows leave room (a ceiling: a floor gave 256 rows
        # one chunk, 256 programs for a wave of 396); otherwise at least STATS_MIN_WAVES
        # waves, so that the last, partly filled one is a small part of the time
        chunks = -(-wave // rows) if rows <= wave else -(-STATS_MIN_WAVES * wave // rows)
    chunks = _clamp(chunks, 1, sblocks)
    tiles_per_chunk = -(-sblocks // chunks)
    chunks = -(-sblocks // tiles_per_chunk)  # no empty chunk
    return Plan(
        "two_pass",
        NUM_WARPS,
        block_c=block_c,
        block_s=block_s,
        cblocks=cblocks,
        sblocks=sblocks,
        chunks=chunks,
        tiles_per_chunk=tiles_per_chunk,
        finalize_block=INTERPRET_FINALIZE_BLOCK if interpret else FINALIZE_BLOCK,
        wave=wave,
    )


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layout(x: torch.Tensor) -> str | None:
    """ "nchw", "channels_last" (channels innermost, pixels dense in order), or None."""
    if x.is_contiguous():
        return "nchw"
    perm = (0, *range(2, x.dim()), 1)
    if x.permute(perm).is_contiguous():
        return "channels_last"
    return None


def _plan_for(x: torch.Tensor, num_groups: int, fused_inputs: bool) -> Plan:
    layout = _layout(x) or "nchw"
    n, c = x.shape[0], x.shape[1]
    s = x.shape[2:].numel()
    cl = layout == "channels_last"
    return plan(n, c, s, num_groups, cl, _num_sms(x.device), itemsize=x.element_size(),
                fused_inputs=fused_inputs, interpret=x.device.type != "cuda")  # fmt: skip


def describe_plan(x: torch.Tensor, num_groups: int, *, fused_inputs: bool = False) -> str:
    """One line saying what ``group_norm`` launches for ``x`` (``fused_inputs``: with an
    input_bias or a residual); the bench logs it."""
    p = _plan_for(x, num_groups, fused_inputs)
    grids = p.grids(x.shape[0], num_groups)
    if p.path == "single":
        return f"single: block {p.block}, {p.num_warps} warps, {grids['single']} programs"
    return (
        f"two_pass: tile [{p.block_c} ch x {p.block_s} px], {p.num_warps} warps, "
        f"{p.chunks} chunks x {p.tiles_per_chunk} tiles; programs stats {grids['stats']} "
        f"({grids['stats'] / p.wave:.2f} waves of {p.wave}), finalize {grids['finalize']}, "
        f"apply {grids['apply']}"
    )


def _check_tensor_arg(name, t, x, *, per_channel: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    c = x.shape[1]
    if per_channel:
        if tuple(t.shape) != (c,):
            raise ValueError(
                f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}"
            )
    elif t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if per_channel and t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if not per_channel and t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype ({x.dtype}), got {t.dtype}")


def _check(x, num_groups, weight, bias, eps, input_bias=None, residual=None) -> None:
    """Raise a ValueError/TypeError naming the argument for every bad input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"x must have rank 3 to 5 (N, C, 1 to 3 spatial dims), got shape {tuple(x.shape)}"
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(
            f"num_groups={num_groups} must be positive and divide the {c} channels of x"
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias), ("input_bias", input_bias)):
        if t is not None:
            _check_tensor_arg(name, t, x, per_channel=True)
    if residual is not None:
        _check_tensor_arg("residual", residual, x, per_channel=False)


def not_supported_reasons(
    x,
    num_groups=32,
    weight=None,
    bias=None,
    eps=1e-6,
    *,
    silu=False,
    input_bias=None,
    residual=None,
    return_sum=False,
):
    """Why ``group_norm`` would run the eager reference instead of the Triton kernels for
    these arguments (empty list: the kernels run). Bad arguments raise instead."""
    _check(x, num_groups, weight, bias, eps, input_bias, residual)
    reasons = []
    if TRITON_ERROR is not None:
        reasons.append(TRITON_ERROR)
    if x.device.type != "cuda" and not interpreting():
        reasons.append(
            f"x is on {x.device.type} and TRITON_INTERPRET is not 1: the eager reference runs"
        )
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of fp32/fp16/bf16")
    inputs = (x, weight, bias, input_bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        reasons.append("an input requires grad: the (differentiable) eager reference runs")
    if x.shape[2:].numel() >= 2**31 - 4 * TILE:
        reasons.append("2^31 pixels per sample or more: pixel indices are int32")
    if x.shape[0] * x.shape[1] >= 2**31:
        reasons.append("N * C >= 2^31: the per-channel scratch indices are int32")
    return reasons


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` dense in ``layout`` ("nchw" or "channels_last"): itself when it already is, else a
    copy (a residual in the other layout: read through its own strides, it cost the kernels
    ~240 registers of layout conversion and spilled)."""
    if _layout(t) == layout:
        return t
    if layout == "nchw":
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _empty_like_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    # x is dense here, so empty_like keeps its strides exactly (the fake kernel does the same).
    if layout == "channels_last":
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _launch(
    x,
    num_groups,
    weight,
    bias,
    eps,
    silu,
    input_bias=None,
    residual=None,
    return_sum=False,
    *,
    path=None,
    chunks=None,
    out=None,
):
    """Run the Triton kernels on validated input; returns (y, s or None). ``path`` and
    ``chunks`` force the launch rule's strategy and split (tests). ``out`` (checked by
    ``_check_out``) receives y; it may be x itself: every program reads the values it
    overwrites before it writes them (one launch: the whole group is in registers; two
    passes: statistics are complete before the apply pass, whose programs each read and
    write one tile)."""
    layout = _layout(x)
    if layout is None:
        x = x.contiguous()
        layout = "nchw"
    cl = layout == "channels_last"
    if residual is not None:
        residual = _in_layout(residual, layout)
    if out is not None and out.stride() != x.stride():  # x was made contiguous above
        raise ValueError(
            f"out must have the strides of x's layout {tuple(x.stride())}, "
            f"got {tuple(out.stride())}"
        )
    y = _empty_like_layout(x, layout) if out is None else out
    total = _empty_like_layout(x, layout) if return_sum else None
    if x.numel() == 0:
        return y, total
    n, c = x.shape[0], x.shape[1]
    s = x.shape[2:].numel()
    cg = c // num_groups
    p = plan(n, c, s, num_groups, cl, _num_sms(x.device), itemsize=x.element_size(),
             fused_inputs=input_bias is not None or residual is not None,
             interpret=x.device.type != "cuda", path=path,
             chunks=chunks)  # fmt: skip
    ib = input_bias if input_bias is not None else x
    r = residual if residual is not None else x
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    out_s = total if total is not None else y
    flags = dict(CL=cl, HAS_IB=input_bias is not None, HAS_RES=residual is not None)
    grids = p.grids(n, num_groups)
    on_other_gpu = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if on_other_gpu else contextlib.nullcontext():
        if p.path == "single":
            _gn_single_kernel[(grids["single"],)](
                x, ib, r, w, b, y, out_s, c, s, cg, num_groups, float(eps),
                BLOCK=p.block, **flags, HAS_W=weight is not None, HAS_B=bias is not None,
                SILU=bool(silu), WRITE_SUM=total is not None, num_warps=p.num_warps,
            )  # fmt: skip
            return y, total
        tile = dict(BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
        part = torch.empty(2 * n * c * p.chunks, dtype=torch.float32, device=x.device)
        coef = torch.empty(3 * n * c, dtype=torch.float32, device=x.device)
        _gn_stats_kernel[(grids["stats"],)](
            x, ib, r, part, n, c, s, cg, p.cblocks, p.chunks, p.tiles_per_chunk, **tile, **flags
        )
        _gn_finalize_kernel[(grids["finalize"],)](
            x, ib, r, w, b, part, coef, n, c, s, cg, num_groups, p.chunks,
            p.tiles_per_chunk * p.block_s, float(eps), BLOCK=p.finalize_block, **flags,
            HAS_W=weight is not None, HAS_B=bias is not None, num_warps=FINALIZE_WARPS,
        )  # fmt: skip
        _gn_apply_kernel[(grids["apply"],)](
            x, ib, r, coef, y, out_s, n, c, s, p.cblocks, p.chunks, p.tiles_per_chunk,
            **tile, **flags, SILU=bool(silu), WRITE_SUM=total is not None,
        )  # fmt: skip
    return y, total


def _forward(x, num_groups, weight, bias, eps, silu, input_bias, residual, return_sum, out=None):
    args = (x, num_groups, weight, bias, eps)
    kw = dict(silu=silu, input_bias=input_bias, residual=residual, return_sum=return_sum)
    if not_supported_reasons(*args, **kw):
        ref = group_norm_reference(*args, **kw)
        y, total = ref if return_sum else (ref, None)
        if out is not None:
            out.copy_(y)
            y = out
        return y, total
    return _launch(*args, silu, input_bias, residual, return_sum, out=out)


def _check_out(out, x, residual) -> None:
    """``out`` for ``group_norm(..., out=)``: x's shape, dtype, device and dense layout; it may
    be x itself, but not the residual (a different tensor read while y is written)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got shape "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if _layout(out) is None or out.stride() != x.stride():
        raise ValueError(
            f"out must be dense with x's strides {tuple(x.stride())}, got {tuple(out.stride())}"
        )
    if residual is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError("out must not be the residual (it is read while y is written)")


# ------------------------------------------------------------------------ torch.library ops
# Two ops, because an op's outputs are fixed by its schema: ``sdvae::group_norm`` -> y and
# ``sdvae::group_norm_sum`` -> (y, s).
@torch.library.custom_op("sdvae::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    input_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    with torch.no_grad():
        return _forward(x, num_groups, weight, bias, eps, silu, input_bias, residual, False)[0]


@torch.library.custom_op("sdvae::group_norm_sum", mutates_args=())
def _group_norm_sum_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    input_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return _forward(x, num_groups, weight, bias, eps, silu, input_bias, residual, True)


def _fake_like(x):
    if _layout(x) == "channels_last":
        return torch.empty_like(x)
    return x.new_empty(x.shape)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, input_bias=None, residual=None):
    _check(x, num_groups, weight, bias, eps, input_bias, residual)
    return _fake_like(x)


@_group_norm_sum_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, input_bias=None, residual=None):
    _check(x, num_groups, weight, bias, eps, input_bias, residual)
    return _fake_like(x), _fake_like(x)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, input_bias, residual = inputs
    ctx.save_for_backward(x, weight, bias, input_bias, residual)
    ctx.args = (num_groups, eps, silu)


def _backward_impl(ctx, grads, return_sum):
    saved = ctx.saved_tensors
    num_groups, eps, silu = ctx.args
    needs = ctx.needs_input_grad
    positions = (0, 2, 3, 6, 7)  # x, weight, bias, input_bias, residual among the inputs
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(needs[i])
            for t, i in zip(saved, positions, strict=True)
        ]
        xs, ws, bs, ibs, rs = leaves
        out = group_norm_reference(
            xs, num_groups, ws, bs, eps, silu=silu, input_bias=ibs, residual=rs,
            return_sum=return_sum,
        )  # fmt: skip
        outs = out if return_sum else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        got = (
            torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs])
            if wrt and pairs
            else [None] * len(wrt)
        )
    got = iter(got)
    result = [None] * 8
    for t, i in zip(leaves, positions, strict=True):
        if t is not None and t.requires_grad:
            result[i] = next(got)
    return tuple(result)


def _backward(ctx, grad):
    return _backward_impl(ctx, (grad,), False)


def _backward_sum(ctx, grad_y, grad_s):
    return _backward_impl(ctx, (grad_y, grad_s), True)


_group_norm_op.register_autograd(_backward, setup_context=_setup_context)
_group_norm_sum_op.register_autograd(_backward_sum, setup_context=_setup_context)


def group_norm(
    x,
    num_groups,
    weight=None,
    bias=None,
    eps=1e-6,
    *,
    silu=False,
    input_bias=None,
    residual=None,
    return_sum=False,
    out=None,
):
    """GroupNorm of ``s = x + input_bias[c] + residual`` over (N, C, *spatial), with optional
    fused SiLU; same memory format out as ``x``. Returns ``y``, or ``(y, s)`` when
    ``return_sum`` (``s`` written once by the same kernel, in ``x``'s dtype and layout).

    ``out``: where to write ``y`` (x's shape, dtype and strides); ``out=x`` normalises in
    place, which is what lets a model free the input's memory (the kernels read every value
    before they overwrite it). Not with inputs that require grad.

    CUDA tensors run the Triton kernels; CPU tensors run ``group_norm_reference`` unless
    ``TRITON_INTERPRET=1``; inputs requiring grad (with grad mode on) run the reference.
    Also available as ``torch.ops.sdvae.group_norm(x, num_groups, weight, bias, eps, silu,
    input_bias=None, residual=None)`` and ``torch.ops.sdvae.group_norm_sum(...)`` -> (y, s).
    """
    if out is not None:
        _check(x, num_groups, weight, bias, eps, input_bias, residual)
        _check_out(out, x, residual)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, input_bias, residual)
        ):
            raise ValueError("out= is for inference: an input requires grad")
    if torch.compiler.is_compiling():
        op = torch.ops.sdvae.group_norm_sum if return_sum else torch.ops.sdvae.group_norm
        res = op(x, num_groups, weight, bias, float(eps), bool(silu), input_bias, residual)
        if out is None:
            return res
        y, total = res if return_sum else (res, None)
        out.copy_(y)
        return (out, total) if return_sum else out
    y, total = _forward(
        x, num_groups, weight, bias, eps, silu, input_bias, residual, bool(return_sum), out
    )
    return (y, total) if return_sum else y
