"""GroupNorm over row bands: partial statistics of one band, and the apply step with given
statistics (+ optional SiLU), for the streamed encode/decode (``sdvae.stream``).

Why a second GroupNorm op. ``group_norm`` normalises a whole tensor: it reduces the statistics
and applies them in one call. The streamed path never holds the whole tensor's normalised
copy; it needs the two halves apart:

* ``group_norm_band_stats(x, G)`` -> ``(mean, m2, count)``: per (sample, group) the mean and
  the centred sum of squares ``M2 = sum((v - mean)^2)`` of the ``count = C/G * H * W`` values
  of the band ``x`` (N, C, H, W), in fp32 (float64 for float64 input). Bands are merged by the
  caller with Chan et al.'s parallel formula, so the statistics of the whole tensor are exact
  whatever the band split (never an average of variances, never ``E[x^2] - E[x]^2``).
* ``group_norm_band_apply(x, mean, rstd, weight, bias, silu=...)``:
  ``y = silu?((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c])`` in fp32, rounded once to
  x's dtype: what ``F.group_norm`` followed by ``F.silu`` computes, with the statistics given.

Both take any strides (a band is often a row slice of a larger tensor: not dense when N > 1),
fp32 / fp16 / bf16 on CUDA (Triton) and the eager references elsewhere (float64 included);
under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors. Output: a fresh tensor in x's
memory format (channels_last when x's channel stride is 1), or ``out``.

Kernels and trade-offs.

* Stats: grid ``N * G * chunks``; each program walks ``per_chunk`` values of one group in
  tiles of ``BLOCK``, forms each tile's mean and centred M2 in registers (an exact two-pass
  over registers), and merges tiles into its running (count, mean, M2) with Chan's formula;
  the host merges the chunk partials (Chan, vectorised). ``chunks`` gives about
  ``STATS_PROGRAMS_PER_SM`` programs per SM. Values are visited in x's memory order
  (channels innermost when x's channel stride is 1, else pixels), with int32 offsets inside a
  group (a group of a band holds fewer than 2^31 values: checked) on an int64 base.
* Apply: one program per tile of a (sample, channel) plane (NCHW-like) or of a (sample, row)
  (channels-last-like), a 1-D grid, ``BLOCK`` values along the contiguous axis; the plane's or row's
  coefficients are scalars or an L1 gather; one int32 division per value for the other index.
  Memory-bound: x read once, y written once.

References: Wu & He, "Group Normalization" (2018); Chan, Golub & LeVeque, "Algorithms for
computing the sample variance" (1979).
"""

from __future__ import annotations

import contextlib

import torch

from .group_norm import TRITON_ERROR, interpreting, tl, triton

if triton is not None:
    from .group_norm import silu_tl

__all__ = [
    "group_norm_band_stats",
    "group_norm_band_stats_reference",
    "group_norm_band_apply",
    "group_norm_band_apply_reference",
    "merge_stats",
    "not_supported_reasons",
    "empty_like_format",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATS_BLOCK = 2048
APPLY_BLOCK = 1024
NUM_WARPS = 8
STATS_PROGRAMS_PER_SM = 4
INTERPRET_BLOCK = 64
INTERPRET_SMS = 2


# --------------------------------------------------------------------------------- references
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_norm_band_stats_reference(x: torch.Tensor, num_groups: int):
    """Eager ``(mean, m2, count)`` of each (sample, group) of the band ``x`` (see the header):
    ``torch.var_mean`` (Welford) on an fp32 (float64 for float64 x) view of the groups."""
    n, c = x.shape[:2]
    xa = x.to(_acc_dtype(x))
    groups = xa.view(n, num_groups, c // num_groups, *x.shape[2:])
    dims = tuple(range(2, groups.dim()))
    var, mean = torch.var_mean(groups, dim=dims, correction=0)
    count = (c // num_groups) * x.shape[2:].numel()
    return mean, var * count, count


def group_norm_band_apply_reference(x, mean, rstd, weight=None, bias=None, *, silu=False):
    """Eager ``silu?((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c])``, in fp32 (float64
    for float64 x) on one working copy of x, rounded once to x's dtype; x's memory format."""
    n, c = x.shape[:2]
    g = mean.shape[1]
    acc = _acc_dtype(x)
    stat = (n, g) + (1,) * (x.dim() - 1)
    y = x.to(acc, copy=True)
    groups = y.view(n, g, c // g, *x.shape[2:])
    groups.sub_(mean.to(acc).view(stat)).mul_(rstd.to(acc).view(stat))
    cshape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y.mul_(weight.to(acc).view(cshape))
    if bias is not None:
        y.add_(bias.to(acc).view(cshape))
    if silu:
        torch.nn.functional.silu(y, inplace=True)
    return y.to(x.dtype)


def merge_stats(mean, m2, count, mean_b, m2_b, count_b):
    """Chan et al.'s parallel combination of two sets of (mean, M2, count) partials (tensors of
    the same shape, counts plain numbers); returns the merged triple. ``mean=None`` is empty."""
    if mean is None:
        return mean_b, m2_b, count_b
    total = count + count_b
    delta = mean_b - mean
    mean = mean + delta * (count_b / total)
    m2 = m2 + m2_b + delta * delta * (count * count_b / total)
    return mean, m2, total


# ----------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _gnb_stats_kernel(
        x_ptr,  # (N, C, H, W) band, any strides
        mean_ptr,  # (N * G * CHUNKS,) fp32 partial means
        m2_ptr,  # (N * G * CHUNKS,) fp32 partial centred sums of squares
        H,
        W,
        Cg,
        G,
        sxn,
        sxc,
        sxh,
        sxw,
        L,  # Cg * H * W values per group (< 2^31)
        per_chunk,  # values per chunk, a multiple of BLOCK
        CHUNKS,
        BLOCK: tl.constexpr,
        C_FAST: tl.constexpr,  # visit channels innermost (x's channel stride is 1)
    ):
        pid = tl.program_id(0)
        chunk = pid % CHUNKS
        ng = pid // CHUNKS
        n = ng // G
        g = ng % G
        base = n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
        start = chunk * per_chunk
        end = tl.minimum(start + per_chunk, L)
        hw = H * W
        cnt = tl.zeros((), tl.float32)
        mean = tl.zeros((), tl.float32)
        m2 = tl.zeros((), tl.float32)
        for off in range(start, end, BLOCK):
            j = off + tl.arange(0, BLOCK)
            mask = j < end
            if C_FAST:
                s = j // Cg
                c = j - s * Cg
            else:
                c = j // hw
                s = j - c * hw
            h = s // W
            w = s - h * W
            rel = c.to(tl.int64) * sxc + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            v = tl.load(x_ptr + base + rel, mask=mask, other=0.0).to(tl.float32)
            nb = tl.minimum(end - off, BLOCK).to(tl.float32)
            mb = tl.sum(v, 0) / nb
            d = tl.where(mask, v - mb, 0.0)
            m2b = tl.sum(d * d, 0)
            tot = cnt + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (cnt / tot * nb)
            cnt = tot
        tl.store(mean_ptr + pid, mean)
        tl.store(m2_ptr + pid, m2)

    @triton.jit
    def _gnb_apply_kernel(
        x_ptr,  # (N, C, H, W) band, any strides
        y_ptr,  # (N, C, H, W) output, any strides
        coef_ptr,  # (N * C * 2,) fp32: the channel's group mean, rstd * weight
        b_ptr,  # (C,) bias or dummy
        C,
        H,
        W,
        sxn,
        sxc,
        sxh,
        sxw,
        syn,
        syc,
        syh,
        syw,
        INNER,  # values along the program's axis: H * W (NCHW-like) or W * C (C_FAST)
        TILES,  # programs per row: cdiv(INNER, BLOCK)
        BLOCK: tl.constexpr,
        C_FAST: tl.constexpr,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = pid // TILES
        j = (pid - row * TILES) * BLOCK + tl.arange(0, BLOCK)
        mask = j < INNER
        if C_FAST:  # program: one (n, h) row; j -> (w, c)
            n = row // H
            h = row - n * H
            w = j // C
            c = j - w * C
            xoff = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh
            yoff = n.to(tl.int64) * syn + h.to(tl.int64) * syh
            xrel = w.to(tl.int64) * sxw + c.to(tl.int64) * sxc
            yrel = w.to(tl.int64) * syw + c.to(tl.int64) * syc
            nc = n * C + c
            m = tl.load(coef_ptr + 2 * nc, mask=mask, other=0.0)
            a = tl.load(coef_ptr + 2 * nc + 1, mask=mask, other=0.0)
            if HAS_B:
                b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        else:  # program: one (n, c) plane; j -> (h, w)
            n = row // C
            c = row - n * C
            h = j // W
            w = j - h * W
            xoff = n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
            yoff = n.to(tl.int64) * syn + c.to(tl.int64) * syc
            xrel = h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            yrel = h.to(tl.int64) * syh + w.to(tl.int64) * syw
            m = tl.load(coef_ptr + 2 * row)
            a = tl.load(coef_ptr + 2 * row + 1)
            if HAS_B:
                b = tl.load(b_ptr + c).to(tl.float32)
        v = tl.load(x_ptr + xoff + xrel, mask=mask, other=0.0).to(tl.float32)
        y = (v - m) * a
        if HAS_B:
            y = y + b
        if SILU:
            y = silu_tl(y)
        tl.store(y_ptr + yoff + yrel, y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ host
def _check_x(x, num_groups) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be positive and divide the {x.shape[1]} channels of x"
        )


def not_supported_reasons(x: torch.Tensor, num_groups: int = 1) -> list[str]:
    """Why the band ops would run their eager reference for ``x`` ([] when the kernels run).
    Bad arguments raise instead."""
    _check_x(x, num_groups)
    reasons = []
    if TRITON_ERROR is not None:
        reasons.append(TRITON_ERROR)
    if x.device.type != "cuda" and not interpreting():
        reasons.append(
            f"x is on {x.device.type} and TRITON_INTERPRET is not 1: the eager reference runs"
        )
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of fp32/fp16/bf16")
    if x.shape[2] * x.shape[3] * max(x.shape[1], 1) >= 2**31:
        reasons.append("a sample of the band holds 2^31 values or more (int32 offsets)")
    if 2 * x.shape[0] * x.shape[1] >= 2**31:
        reasons.append("2 * N * C >= 2^31: the (mean, rstd) scratch indices are int32")
    if torch.is_grad_enabled() and x.requires_grad:
        reasons.append("x requires grad: the (differentiable) eager reference runs")
    return reasons


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _c_fast(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.stride(1) == 1


def _device_guard(x: torch.Tensor):
    other = x.is_cuda and x.device.index != torch.cuda.current_device()
    return torch.cuda.device(x.device) if other else contextlib.nullcontext()


def _stats_launch(x: torch.Tensor, num_groups: int):
    n, c, h, w = x.shape
    cg = c // num_groups
    length = cg * h * w
    block = INTERPRET_BLOCK if x.device.type != "cuda" else STATS_BLOCK
    tiles = triton.cdiv(length, block)
    rows = n * num_groups
    chunks = max(1, min(tiles, triton.cdiv(STATS_PROGRAMS_PER_SM * _num_sms(x.device), rows)))
    per_chunk = triton.cdiv(tiles, chunks) * block
    chunks = triton.cdiv(length, per_chunk)  # no empty chunk
    part = torch.empty(2, rows * chunks, dtype=torch.float32, device=x.device)
    with _device_guard(x):
        _gnb_stats_kernel[(rows * chunks,)](
            x, part[0], part[1], h, w, cg, num_groups, *x.stride(), length, per_chunk, chunks,
            BLOCK=block, C_FAST=_c_fast(x), num_warps=NUM_WARPS,
        )  # fmt: skip
    counts = torch.full((chunks,), float(per_chunk), dtype=torch.float32, device=x.device)
    counts[-1] = float(length - per_chunk * (chunks - 1))
    means = part[0].view(n, num_groups, chunks)
    m2s = part[1].view(n, num_groups, chunks)
    # Chan's formula over all chunks at once: M2 = sum M2_k + sum n_k (mean_k - mean)^2.
    mean = (means * counts).sum(-1) / length
    m2 = m2s.sum(-1) + ((means - mean.unsqueeze(-1)) ** 2 * counts).sum(-1)
    return mean, m2, length


def group_norm_band_stats(x: torch.Tensor, num_groups: int):
    """``(mean, m2, count)`` per (sample, group) of the band ``x`` (N, C, H, W): mean and
    centred sum of squares, (N, G) fp32 tensors (float64 for float64 x), and the number of
    values per group (an int). See the module header."""
    _check_x(x, num_groups)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if not_supported_reasons(x, num_groups):
        return group_norm_band_stats_reference(x, num_groups)
    return _stats_launch(x, num_groups)


def _check_apply(x, mean, rstd, weight, bias, out) -> None:
    n, c = x.shape[:2]
    for name, t in (("mean", mean), ("rstd", rstd)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1 or c % t.shape[1]:
            raise ValueError(
                f"{name} must be (N, G) with N = {n} and G dividing {c}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if mean.shape != rstd.shape:
        raise ValueError(f"mean and rstd shapes differ: {tuple(mean.shape)}, {tuple(rstd.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )


def empty_like_format(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``x`` in the layout the band kernels write (channels_last when
    ``x`` is, else contiguous)."""
    fmt = torch.channels_last if _c_fast(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def group_norm_band_apply(x, mean, rstd, weight=None, bias=None, *, silu=False, out=None):
    """``silu?((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c])`` for a band ``x``
    (N, C, H, W; any strides) with the given (N, G) statistics; a fresh tensor in x's memory
    format, or ``out`` (x's shape and dtype, any strides; it may be x itself). fp32 inside,
    rounded once."""
    _check_x(x, 1)
    _check_apply(x, mean, rstd, weight, bias, out)
    if not_supported_reasons(x, mean.shape[1]):
        y = group_norm_band_apply_reference(x, mean, rstd, weight, bias, silu=silu)
        if out is None:
            return y
        return out.copy_(y)
    y = empty_like_format(x) if out is None else out
    if x.numel() == 0:
        return y
    n, c, h, w = x.shape
    g = mean.shape[1]
    a = rstd.float().repeat_interleave(c // g, dim=1)
    if weight is not None:
        a = a * weight.float()
    coef = torch.stack([mean.float().repeat_interleave(c // g, dim=1), a], dim=-1).contiguous()
    block = INTERPRET_BLOCK if x.device.type != "cuda" else APPLY_BLOCK
    c_fast = _c_fast(x)
    inner = w * c if c_fast else h * w
    rows = n * h if c_fast else n * c
    tiles = triton.cdiv(inner, block)
    with _device_guard(x):
        _gnb_apply_kernel[(rows * tiles,)](
            x, y, coef, bias if bias is not None else coef, c, h, w, *x.stride(), *y.stride(),
            inner, tiles, BLOCK=block, C_FAST=c_fast, HAS_B=bias is not None, SILU=bool(silu),
            num_warps=4,
        )  # fmt: skip
    return y


# ------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("sdvae::group_norm_band_stats", mutates_args=())
def _stats_op(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mean, m2, _ = group_norm_band_stats(x, num_groups)
    return mean, m2


@_stats_op.register_fake
def _(x, num_groups):
    _check_x(x, num_groups)
    shape = (x.shape[0], num_groups)
    return x.new_empty(shape, dtype=_acc_dtype(x)), x.new_empty(shape, dtype=_acc_dtype(x))


@torch.library.custom_op("sdvae::group_norm_band_apply", mutates_args=())
def _apply_op(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    with torch.no_grad():
        return group_norm_band_apply(x, mean, rstd, weight, bias, silu=silu)


@_apply_op.register_fake
def _(x, mean, rstd, weight, bias, silu):
    _check_x(x, 1)
    _check_apply(x, mean, rstd, weight, bias, None)
    return empty_like_format(x)
