"""Fused GroupNorm (+ optional SiLU) in Triton, for NCHW and channels_last tensors.

What it computes
----------------
``y = silu?((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c])`` for ``x`` of shape
``(N, C, *spatial)`` (1 to 3 spatial dims, ``S`` = their product), ``G`` groups of
``Cg = C // G`` channels, statistics over the ``Cg * S`` values of each ``(n, g)``,
``rstd = 1 / sqrt(var + eps)`` with the biased variance — exactly ``F.group_norm`` followed by
``F.silu``. fp32, fp16 and bf16 inputs; weight/bias in the input's dtype or fp32; statistics
and arithmetic in fp32; the output has the input's dtype and memory format.

Numerics
--------
Variance is never ``E[x^2] - E[x]^2``. Each tile computes its own mean and centred sum of
squares, and tiles are combined with Chan et al.'s pairwise update (the parallel form of
Welford). On top of that every value is first shifted by ``K`` = the group's first element
(any value from the data works): for an input with mean 1e4 and std 1 the fp32 mean of ``x``
itself is only known to ~5e-4, which would already cost 5e-4 relative error in ``x - mean``;
the mean of ``x - K`` is O(std) and known to fp32's relative precision, and ``x - K`` is exact
(Sterbenz). The normalisation is then ``(x - K) * a + c`` with ``a = rstd * w`` and
``c = b - mean_shifted * a``, one subtract and one FMA per value.

Design and which strategy runs when
-----------------------------------
Every kernel walks tiles of ``[BLOCK_S pixels, BLOCK_G groups, BLOCK_CG channels of a group]``
(``_plan`` picks them, ``BLOCK_S * BLOCK_G * BLOCK_CG = 4096`` values, 8 warps):

* NCHW: a group is one contiguous run of ``Cg * S`` values; tiles are ``[4096 / Cg_p2, 1, Cg_p2]``
  so every row of the tile is ``BLOCK_S`` contiguous pixels of one channel.
* channels_last: a pixel holds all ``C`` channels contiguously, so tiles span many groups —
  ``[16..128 pixels, 8..32 groups, Cg_p2]`` — and each pixel's channel vector is read in one
  piece; per-group sums are reductions over the tile's pixel and channel axes. No transpose.
* ``Cg > 32`` is walked in channel blocks of 32 inside the program.
* When Cg is that power of two (``CG_EXACT``, the VAE's Cg = 4, 8, 16) the kernels use the
  constant ``BLOCK_CG`` for Cg, so the compiler can prove channel offsets aligned and emit
  16-byte vector accesses; tile loops count tiles (not offsets) for the same reason.
* The tile set is fixed per (layout, Cg rounded up to a power of two, CG_EXACT), 20 in all,
  so every configuration is compiled ahead of time in the tests. The price: channels_last
  with fewer than 32 (or 16, 8) groups leaves tile lanes masked, as does a non-power-of-two
  Cg.

Two strategies, chosen per shape by ``_plan``:

* **split** (two kernels, the VAE's shapes): at N=1, G=32 one program per group would leave
  100 of an H100's 132 SMs idle, so each group's pixels are cut into ``split`` chunks so that
  about 8 programs per SM run. ``_gn_stats_kernel`` writes each chunk's (mean, M2) to a small
  fp32 buffer; ``_gn_apply_kernel`` merges a group's partials (Chan) and normalises its chunk.
  x is read twice: the apply pass walks its chunk in reverse, so the tiles the stats pass read
  last are still in L2: all of it while the tensor is under ~40 MB (at batch 1 in fp16:
  512x64^2, 512x128^2 and 256x256^2), the last ~40 MB of it otherwise.
  The split is ``min(ceil(8 * SMs / programs per split), tiles per group // 2, 256)``: at
  least two tiles per program keep the merge of partials cheap.
* **fused** (one kernel, ``_gn_fused_kernel``) whenever that split comes out as 1: the groups
  alone already give 8 programs per SM (large batches), or a group is at most 3 tiles (12K
  values: it stays on chip). One program owns whole groups: it computes the statistics, then
  re-reads its group (from L1/L2: it was just read) and writes the output. One launch, no
  partials.

Offsets: each program's base offset (batch, group, pixel chunk) is int64; offsets inside a tile
are int32, so ``not_supported_reasons`` sends groups (or 128-pixel rows) of 2^31 values or
more to the reference.

References: Wu & He, "Group Normalization" (2018); Chan, Golub & LeVeque, "Algorithms for
computing the sample variance" (1979); the Triton layer-norm tutorial and Apex/Liger-Kernel
group-norm kernels for the two-pass structure.
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

    _TRITON_ERROR = None
except ImportError as _exc:  # CPU-only installs still get the reference path
    triton = None
    tl = None
    _TRITON_ERROR = f"triton is not importable ({_exc})"

__all__ = ["group_norm", "group_norm_reference", "not_supported_reasons"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: values per tile, warps per program, channel block cap, merge block, programs per SM.
TILE = 4096
NUM_WARPS = 8
MAX_BLOCK_CG = 32
MERGE_BLOCK = 16
MAX_SPLIT = 256
PROGRAMS_PER_SM = 8
#: under the interpreter (tests): the SM count assumed (there is no device to ask) and a
#: smaller tile, so tiny shapes still walk several tiles and the numpy emulation stays quick.
INTERPRET_SMS = 4
INTERPRET_TILE = 256


# --------------------------------------------------------------------------------- reference
def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False):
    """Eager ``F.group_norm`` then optional ``F.silu``, in ``x``'s dtype (float64 when given
    float64); weight/bias are cast to ``x``'s dtype first."""
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = F.group_norm(x, num_groups, w, b, eps)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _tile(
        x_ptr,  # (N, C, S) in NCHW or channels_last order, fp32/fp16/bf16
        base,  # int64 offset of (n, channel g0 * Cg + j0, pixel s0)
        s0,
        s_end,
        g0,
        j0,
        S,
        C,
        Cg,
        G,
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
    ):
        """Offsets (int32, relative to ``base``) and mask of one [BLOCK_S, BLOCK_G, BLOCK_CG]
        tile starting at pixel ``s0``, group ``g0``, channel-in-group ``j0``."""
        ds = tl.arange(0, BLOCK_S)[:, None, None]
        dg = tl.arange(0, BLOCK_G)[None, :, None]
        dj = tl.arange(0, BLOCK_CG)[None, None, :]
        dc = dg * Cg + dj
        if CHANNELS_LAST:
            offs = ds * C + dc
        else:
            offs = dc * S + ds
        mask = (s0 + ds < s_end) & (g0 + dg < G) & (j0 + dj < Cg)
        return offs, mask

    @triton.jit
    def _shift(x_ptr, n, g0, S, C, Cg, G, BLOCK_G: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """K[g] = x[n, g * Cg, pixel 0] for the block's groups, as fp32 [BLOCK_G]."""
        g = g0 + tl.arange(0, BLOCK_G)
        c = (g * Cg).to(tl.int64)
        if CHANNELS_LAST:
            off = c
        else:
            off = c * S
        k = tl.load(x_ptr + n.to(tl.int64) * C * S + off, mask=g < G, other=0.0)
        return k.to(tl.float32)

    @triton.jit
    def _chunk_stats(
        x_ptr,  # (N, C, S)
        n,
        g0,
        k,  # [BLOCK_G] fp32 shift per group
        s_start,
        s_end,
        S,
        C,
        Cg,
        G,
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
    ):
        """Mean and M2 of ``x - k`` over pixels [s_start, s_end) of the block's groups, tile by
        tile with Chan's merge. Returns ([BLOCK_G] mean, [BLOCK_G] M2)."""
        mean = tl.zeros([BLOCK_G], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        count = 0.0
        kk = k[None, :, None]
        if CHANNELS_LAST:
            stride_c = 1
            stride_s = C
        else:
            stride_c = S
            stride_s = 1
        n_base = n.to(tl.int64) * C * S + (g0 * Cg).to(tl.int64) * stride_c
        zero = n_base * 0  # int64: loop counters may be Python ints (interpreter)
        n_tiles = tl.cdiv(s_end - s_start, BLOCK_S)
        for jb in range(0, tl.cdiv(Cg, BLOCK_CG)):
            j0 = jb * BLOCK_CG
            nj = tl.minimum(s_end * 0 + Cg - j0, BLOCK_CG)
            for t in range(0, n_tiles):
                s0 = s_start + t * BLOCK_S
                base = n_base + (zero + j0) * stride_c + (zero + s0) * stride_s
                offs, mask = _tile(
                    x_ptr, base, s0, s_end, g0, j0, S, C, Cg, G,
                    BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST,
                )  # fmt: skip
                v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(mask, v - kk, 0.0)
                t_count = (tl.minimum(s_end - s0, BLOCK_S) * nj).to(tl.float32)
                t_mean = tl.sum(tl.sum(v, axis=2), axis=0) / t_count
                d = tl.where(mask, v - t_mean[None, :, None], 0.0)
                t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
                new_count = count + t_count
                delta = t_mean - mean
                mean = mean + delta * (t_count / new_count)
                m2 = m2 + t_m2 + delta * delta * (count * t_count / new_count)
                count = new_count
        return mean, m2

    @triton.jit
    def _normalize_chunk(
        x_ptr,  # (N, C, S) input
        y_ptr,  # (N, C, S) output, same layout and dtype as x
        w_ptr,  # (C,) weight, x's dtype or fp32 (unused unless HAS_W)
        b_ptr,  # (C,) bias, x's dtype or fp32 (unused unless HAS_B)
        n,
        g0,
        k,  # [BLOCK_G] fp32 shift
        mean,  # [BLOCK_G] fp32 mean of x - k
        rstd,  # [BLOCK_G] fp32
        s_start,
        s_end,
        S,
        C,
        Cg,
        G,
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
    ):
        """Write y for pixels [s_start, s_end) of the block's groups, last tile first (the
        tiles a preceding sweep read last are the ones still in cache)."""
        if CHANNELS_LAST:
            stride_c = 1
            stride_s = C
        else:
            stride_c = S
            stride_s = 1
        n_base = n.to(tl.int64) * C * S + (g0 * Cg).to(tl.int64) * stride_c
        zero = n_base * 0  # int64: loop counters may be Python ints (interpreter)
        gg = g0 + tl.arange(0, BLOCK_G)[:, None]
        kk = k[None, :, None]
        n_tiles = tl.cdiv(s_end - s_start, BLOCK_S)
        for jb in range(0, tl.cdiv(Cg, BLOCK_CG)):
            j0 = jb * BLOCK_CG
            jj = j0 + tl.arange(0, BLOCK_CG)[None, :]
            cmask = (gg < G) & (jj < Cg)
            ch = gg * Cg + jj
            a = tl.broadcast_to(rstd[:, None], (BLOCK_G, BLOCK_CG))
            if HAS_W:
                a = a * tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
            c = -mean[:, None] * a
            if HAS_B:
                c = c + tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
            a = a[None, :, :]
            c = c[None, :, :]
            for t in range(0, n_tiles):
                s0 = s_start + (n_tiles - 1 - t) * BLOCK_S
                base = n_base + (zero + j0) * stride_c + (zero + s0) * stride_s
                offs, mask = _tile(
                    x_ptr, base, s0, s_end, g0, j0, S, C, Cg, G,
                    BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST,
                )  # fmt: skip
                v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                out = (v - kk) * a + c
                if SILU:
                    out = out / (1.0 + tl.exp(-out))
                tl.store(y_ptr + base + offs, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_fused_kernel(
        x_ptr,  # (N, C, S) input
        y_ptr,  # (N, C, S) output
        w_ptr,  # (C,) or dummy
        b_ptr,  # (C,) or dummy
        S,
        C,
        Cg,
        G,
        num_gblocks,
        eps,
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        CG_EXACT: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
    ):
        """Grid (N * num_gblocks,): one program owns BLOCK_G whole groups of one sample."""
        if CG_EXACT:  # Cg == BLOCK_CG: a constant, so channel offsets stay aligned
            Cg = BLOCK_CG
        pid = tl.program_id(0)
        n = pid // num_gblocks
        g0 = (pid % num_gblocks) * BLOCK_G
        k = _shift(x_ptr, n, g0, S, C, Cg, G, BLOCK_G, CHANNELS_LAST)
        s_start = pid * 0
        s_end = s_start + S
        mean, m2 = _chunk_stats(
            x_ptr, n, g0, k, s_start, s_end, S, C, Cg, G, BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST
        )
        rstd = 1.0 / tl.sqrt(m2 / (Cg * S) + eps)
        _normalize_chunk(
            x_ptr, y_ptr, w_ptr, b_ptr, n, g0, k, mean, rstd, s_start, s_end, S, C, Cg, G,
            BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST, HAS_W, HAS_B, SILU,
        )  # fmt: skip

    @triton.jit
    def _gn_stats_kernel(
        x_ptr,  # (N, C, S) input
        part_ptr,  # (2, N, G, split) fp32: mean and M2 of x - K per pixel chunk
        S,
        C,
        Cg,
        G,
        num_gblocks,
        split,
        chunk_s,  # pixels per chunk, a multiple of BLOCK_S
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        CG_EXACT: tl.constexpr,
    ):
        """Grid (N * num_gblocks, split): partial statistics of one pixel chunk."""
        if CG_EXACT:  # Cg == BLOCK_CG: a constant, so channel offsets stay aligned
            Cg = BLOCK_CG
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        n = pid // num_gblocks
        g0 = (pid % num_gblocks) * BLOCK_G
        s_start = sp * chunk_s
        s_end = tl.minimum(s_start + chunk_s, S)
        k = _shift(x_ptr, n, g0, S, C, Cg, G, BLOCK_G, CHANNELS_LAST)
        mean, m2 = _chunk_stats(
            x_ptr, n, g0, k, s_start, s_end, S, C, Cg, G,
            BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST,
        )  # fmt: skip
        g = g0 + tl.arange(0, BLOCK_G)
        idx = (n * G + g).to(tl.int64) * split + sp
        total = tl.num_programs(0) // num_gblocks * G * split
        tl.store(part_ptr + idx, mean, mask=g < G)
        tl.store(part_ptr + total + idx, m2, mask=g < G)

    @triton.jit
    def _gn_apply_kernel(
        x_ptr,  # (N, C, S) input
        y_ptr,  # (N, C, S) output
        w_ptr,  # (C,) or dummy
        b_ptr,  # (C,) or dummy
        part_ptr,  # (2, N, G, split) fp32 from _gn_stats_kernel
        S,
        C,
        Cg,
        G,
        num_gblocks,
        split,
        chunk_s,
        eps,
        BLOCK_S: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_CG: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        CG_EXACT: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
        MERGE: tl.constexpr,
    ):
        """Grid (N * num_gblocks, split): merge the groups' partials, normalise one chunk."""
        if CG_EXACT:  # Cg == BLOCK_CG: a constant, so channel offsets stay aligned
            Cg = BLOCK_CG
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        n = pid // num_gblocks
        g0 = (pid % num_gblocks) * BLOCK_G
        g = g0 + tl.arange(0, BLOCK_G)
        total = tl.num_programs(0) // num_gblocks * G * split
        row = (n * G + g).to(tl.int64)[:, None] * split
        mean = tl.zeros([BLOCK_G], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        count = tl.zeros([BLOCK_G], dtype=tl.float32)
        for p0 in range(0, split, MERGE):
            p = p0 + tl.arange(0, MERGE)[None, :]
            pmask = (g[:, None] < G) & (p < split)
            p_mean = tl.load(part_ptr + row + p, mask=pmask, other=0.0)
            p_m2 = tl.load(part_ptr + total + row + p, mask=pmask, other=0.0)
            px = tl.minimum(S - p * chunk_s, chunk_s)
            p_count = tl.where(p < split, px * Cg, 0).to(tl.float32)
            b_count = tl.sum(p_count, axis=1)
            b_mean = tl.sum(p_count * p_mean, axis=1) / b_count
            dev = p_mean - b_mean[:, None]
            b_m2 = tl.sum(p_m2 + p_count * dev * dev, axis=1)
            new_count = count + b_count
            delta = b_mean - mean
            mean = mean + delta * (b_count / new_count)
            m2 = m2 + b_m2 + delta * delta * (count * b_count / new_count)
            count = new_count
        rstd = 1.0 / tl.sqrt(m2 / (Cg * S) + eps)
        k = _shift(x_ptr, n, g0, S, C, Cg, G, BLOCK_G, CHANNELS_LAST)
        s_start = sp * chunk_s
        s_end = tl.minimum(s_start + chunk_s, S)
        _normalize_chunk(
            x_ptr, y_ptr, w_ptr, b_ptr, n, g0, k, mean, rstd, s_start, s_end, S, C, Cg, G,
            BLOCK_S, BLOCK_G, BLOCK_CG, CHANNELS_LAST, HAS_W, HAS_B, SILU,
        )  # fmt: skip


# ------------------------------------------------------------------------------------ host
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


class Plan(NamedTuple):
    """What the launcher runs: ``strategy`` is "fused" or "split"."""

    strategy: str
    block_s: int
    block_g: int
    block_cg: int
    num_gblocks: int
    split: int
    chunk_s: int
    num_warps: int


def tile_shape(channels_last: bool, cg: int, tile: int = TILE) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_G, BLOCK_CG) for a layout and channels per group."""
    block_cg = min(_next_pow2(cg), MAX_BLOCK_CG)
    block_g = max(1, min(32, 256 // block_cg)) if channels_last else 1
    block_g = min(block_g, max(1, tile // block_cg))
    block_s = max(1, tile // (block_g * block_cg))
    return block_s, block_g, block_cg


@functools.lru_cache(maxsize=512)
def _plan(
    n: int,
    c: int,
    s: int,
    groups: int,
    channels_last: bool,
    num_sms: int,
    tile: int = TILE,
    split: int | None = None,
) -> Plan:
    """Pick the strategy and tile for one shape (``split`` forces the pixel split: tests)."""
    cg = c // groups
    block_s, block_g, block_cg = tile_shape(channels_last, cg, tile)
    num_gblocks = -(-groups // block_g)
    tiles_s = -(-s // block_s)
    if split is None:
        target = PROGRAMS_PER_SM * num_sms
        # at least two tiles per program, so merging the partials stays cheap
        split = min(-(-target // (n * num_gblocks)), max(1, tiles_s // 2), MAX_SPLIT)
    split = max(1, min(split, tiles_s))
    per_split = -(-tiles_s // split)
    split = -(-tiles_s // per_split)  # no empty chunks
    chunk_s = per_split * block_s
    strategy = "fused" if split == 1 else "split"
    return Plan(strategy, block_s, block_g, block_cg, num_gblocks, split, chunk_s, NUM_WARPS)


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


def _check(x, num_groups, weight, bias, eps) -> None:
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
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(
                f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")


def not_supported_reasons(x, num_groups=32, weight=None, bias=None, eps=1e-6, *, silu=False):
    """Why ``group_norm`` would run the eager reference instead of the Triton kernel for these
    arguments (empty list: the kernel runs). Bad arguments raise instead."""
    _check(x, num_groups, weight, bias, eps)
    reasons = []
    if _TRITON_ERROR is not None:
        reasons.append(_TRITON_ERROR)
    if x.device.type != "cuda" and not _interpreting():
        reasons.append(
            f"x is on {x.device.type} and TRITON_INTERPRET is not 1: the eager reference runs"
        )
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of fp32/fp16/bf16")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        reasons.append("an input requires grad: the (differentiable) eager reference runs")
    c = x.shape[1]
    s = x.shape[2:].numel()
    if (c // num_groups) * s >= 2**31 or 128 * c >= 2**31:
        reasons.append(
            "a group (or 128 pixels of channels) is 2^31 values or more: int32 tile offsets"
        )
    return reasons


def _launch(x, num_groups, weight, bias, eps, silu, *, tile=None, split=None):
    """Run the Triton kernels on a validated input (``tile``/``split`` override: tests)."""
    layout = _layout(x)
    if layout is None:
        x = x.contiguous()
        layout = "nchw"
    channels_last = layout == "channels_last"
    n, c = x.shape[0], x.shape[1]
    s = x.shape[2:].numel()
    # x is dense here, so empty_like keeps its strides exactly (the fake kernel does the same).
    y = (
        torch.empty_like(x)
        if channels_last
        else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    )
    if x.numel() == 0:
        return y
    if tile is None:
        tile = INTERPRET_TILE if x.device.type != "cuda" else TILE
    plan = _plan(n, c, s, num_groups, channels_last, _num_sms(x.device), tile, split)
    cg = c // num_groups
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    common = dict(
        BLOCK_S=plan.block_s,
        BLOCK_G=plan.block_g,
        BLOCK_CG=plan.block_cg,
        CHANNELS_LAST=channels_last,
        CG_EXACT=c // num_groups == plan.block_cg,
        num_warps=plan.num_warps,
    )
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu))
    on_other_gpu = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if on_other_gpu else contextlib.nullcontext():
        if plan.strategy == "fused":
            grid = (n * plan.num_gblocks,)
            _gn_fused_kernel[grid](
                x, y, w, b, s, c, cg, num_groups, plan.num_gblocks, float(eps), **common, **flags
            )
        else:
            part = torch.empty(
                2 * n * num_groups * plan.split, dtype=torch.float32, device=x.device
            )
            grid = (n * plan.num_gblocks, plan.split)
            _gn_stats_kernel[grid](
                x, part, s, c, cg, num_groups, plan.num_gblocks, plan.split, plan.chunk_s, **common
            )
            _gn_apply_kernel[grid](
                x, y, w, b, part, s, c, cg, num_groups, plan.num_gblocks, plan.split,
                plan.chunk_s, float(eps), **common, **flags, MERGE=MERGE_BLOCK,
            )  # fmt: skip
    return y


def _forward(x, num_groups, weight, bias, eps, silu):
    if not_supported_reasons(x, num_groups, weight, bias, eps, silu=silu):
        return group_norm_reference(x, num_groups, weight, bias, eps, silu=silu)
    return _launch(x, num_groups, weight, bias, eps, silu)


# ------------------------------------------------------------------------ torch.library op
@torch.library.custom_op("sdvae::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    with torch.no_grad():
        return _forward(x, num_groups, weight, bias, eps, silu)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    _check(x, num_groups, weight, bias, eps)
    if x.dim() >= 3 and _layout(x) == "channels_last":
        return torch.empty_like(x)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, silu)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, silu = ctx.args
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        xs = x.detach().requires_grad_(needs[0])
        ws = None if weight is None else weight.detach().requires_grad_(needs[2])
        bs = None if bias is None else bias.detach().requires_grad_(needs[3])
        out = group_norm_reference(xs, num_groups, ws, bs, eps, silu=silu)
        wrt = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad) if wrt else ())
    gx = next(grads) if needs[0] else None
    gw = next(grads) if weight is not None and needs[2] else None
    gb = next(grads) if bias is not None and needs[3] else None
    return gx, None, gw, gb, None, None


_group_norm_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, *, silu=False):
    """GroupNorm over (N, C, *spatial) with optional fused SiLU; same memory format out as in.

    CUDA tensors run the Triton kernels; CPU tensors run ``group_norm_reference`` unless
    ``TRITON_INTERPRET=1``; inputs requiring grad (with grad mode on) run the reference.
    Also available as ``torch.ops.sdvae.group_norm(x, num_groups, weight, bias, eps, silu)``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.sdvae.group_norm(x, num_groups, weight, bias, float(eps), bool(silu))
    return _forward(x, num_groups, weight, bias, eps, silu)
