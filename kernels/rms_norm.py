"""Fused channel RMS norm (+ optional SiLU) of the Wan video VAE, in Triton, for contiguous
and channels-last tensors.

What it computes
----------------
diffusers' ``WanRMS_norm`` (``channel_first=True``), optionally followed by SiLU: for ``x`` of
shape ``(N, C, *spatial)`` (1 to 3 spatial dims, ``S`` pixels per sample), at every pixel,
over the ``C`` channels of dim 1,

    y = x / max(||x||_2, eps) * sqrt(C) * gamma[c] + bias[c]       (F.normalize(x, dim=1))
    y = silu(y)                                                     (when silu)

of ``x + input_bias[c]`` when ``input_bias`` is given: the bias of the conv that produced
``x``, left out of that conv and added here, in the loads (one pass over the conv's output
fewer; the sum is not rounded to ``x``'s dtype first).

``gamma`` may have any shape with ``C`` elements (diffusers keeps ``(C, 1, 1)`` for images and
``(C, 1, 1, 1)`` for video), ``bias`` is optional (``None``, or diffusers' default ``0.0``, is
no bias). fp32, fp16, bf16 and float64 ``x``; gamma/bias in ``x``'s dtype or fp32; the output
has ``x``'s dtype and memory format. The 5-D ``(N, C, T, H, W)`` tensors of the Wan VAE and the
4-D ``(N*T, C, H, W)`` ones of its attention block both run, contiguous or channels-last
(``channels_last_3d`` / ``channels_last``), without a layout copy; other strides are made
contiguous first.

Design
------
One kernel, one launch. A program owns a tile of ``BLOCK_P`` pixels x ``BLOCK_C`` channels,
held as ``[BLOCK_C, BLOCK_P]`` in registers (reduced over axis 0, the channels); only which
axis is contiguous in memory differs between the layouts (the ``CL`` constexpr), and Triton's
coalescing puts the 16-byte vectors along it: the channels in channels-last (pixels are rows
of ``C`` values, one flat run of ``N * S`` rows), the pixels in contiguous ``NC...`` (one
sample's channel planes of ``S`` values; the grid walks ``N * cdiv(S, BLOCK_P)`` tiles). A
tensor with ``S == 1`` is laid out the same way in both formats and takes the channels-last
path.

* ``C <= MAX_BLOCK_C`` (1024, every Wan VAE norm: 96/192/384 channels in Wan 2.1, up to 1024 in
  Wan 2.2): the whole channel vector of each pixel sits in registers: ``x`` is read once, the
  sum of squares formed, and ``y`` written once.
* larger ``C``: the program loops over channel blocks twice, first for the sum of squares,
  then to normalise and write (``x`` is read twice, the second time mostly from L2).

Launch rule (no autotuning; ``plan`` implements it)
---------------------------------------------------
``BLOCK_C = clamp(next_pow2(C), 8, MAX_BLOCK_C)``; a tile holds ``TILE`` = 4096 values (2048
for float64):

* channels-last: ``BLOCK_P = TILE // BLOCK_C`` (4 pixels at 1024 channels);
* contiguous: ``BLOCK_P = max(TILE // BLOCK_C, 32 bytes)``, so that every channel row of a
  tile is at least one full 32-byte memory sector (16 fp16 pixels: 8192 values at 512
  channels, 16384 at 1024).

``num_warps = clamp(BLOCK_C * BLOCK_P // (32 * per_thread), 1, 16)`` with ``per_thread`` =
16 values (8 for float64, two registers each); at the 16-warp cap the contiguous fp16/bf16
tile of 1024 channels holds 32 values per thread. That holds when the contiguous axis takes
16-byte vectors, which Triton's JIT decides from its specialisations: x and y 16-byte aligned
and ``C`` (channels-last) or ``S`` (contiguous) divisible by 16, true at the Wan VAE's
shapes. Otherwise every value needs its own address: ``per_thread`` and the minimum row are
halved (16-byte rows). The launcher checks the same conditions (``vector``). With these
rules every configuration compiles for sm_80 and sm_90 without register spills (32-80
registers for fp16/bf16/fp32 with vectors, up to ~110 with scalar accesses; the AOT test
checks them all): a 16384-value tile with scalar accesses spilled.

Under ``TRITON_INTERPRET=1`` (tests) the rule is the same with ``MAX_BLOCK_C`` = 16, ``TILE`` =
256 and 8-byte minimum rows, so small shapes take the channel loop and several tiles.

Numerics
--------
Statistics and arithmetic in fp32 (float64 for float64 ``x``); the output is rounded once.
The per-pixel factor ``a = sqrt(C) / max(sqrt(sum x^2), eps)`` uses IEEE-rounded square root
and division (``sqrt_rn``/``div_rn`` in fp32), then ``y = x * a * gamma + bias``. (diffusers
normalises half-precision inputs in fp32 and rounds the normalised value to the input dtype
before the affine step; the kernel rounds only the result, so it is slightly closer to the
float64 reference.) The sum of squares is not rescaled: it overflows to ``inf`` for fp32 or
bf16 values above ~1e19 (fp16 cannot reach them), giving 0 (or NaN) there. A NaN anywhere in
a pixel's channels makes its whole output NaN, as in ``F.normalize``. SiLU is
``y / (1 + exp(min(-y, 80)))``.

Offsets: the per-pixel and per-channel bases are int64 (tensors of 2^31 values and more);
in contiguous tensors the pixel index within a sample is int32, so ``S >= 2^31 - 2^16``
runs the reference.

References: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019); diffusers
``models/autoencoders/autoencoder_kl_wan.py`` (``WanRMS_norm``), the op this replaces.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except ImportError as _exc:  # CPU-only installs still get the reference path
    if _exc.name is None or _exc.name.split(".")[0] != "triton":
        raise
    triton = None
    tl = None
    TRITON_ERROR = f"triton is not importable ({_exc})"

__all__ = ["not_supported_reasons", "plan", "rms_norm", "rms_norm_reference"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: The launch rule's constants (module header), GPU values then the interpreter's.
MAX_BLOCK_C = 1024
MIN_BLOCK_C = 8
TILE = 4096
MIN_ROW_BYTES = 32
VALUES_PER_THREAD = 16
MAX_WARPS = 16
INTERPRET_MAX_BLOCK_C = 16
INTERPRET_TILE = 256
INTERPRET_MIN_ROW_BYTES = 8
#: Contiguous tensors index pixels within a sample in int32: at least this many run the
#: reference.
MAX_PIXELS = 2**31 - 2**16


# --------------------------------------------------------------------------------- reference
def _as_bias(bias):
    """``bias`` with diffusers' "no bias" (the number 0) as None; anything else unchanged."""
    if isinstance(bias, numbers.Real) and not isinstance(bias, bool) and bias == 0:
        return None
    return bias


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 2))).to(x.dtype)


def rms_norm_reference(x, weight, bias=None, *, eps=1e-12, silu=False, input_bias=None):
    """Eager ``WanRMS_norm`` the way diffusers computes it: ``F.normalize(x, dim=1, eps=eps)``
    (in fp32 for inputs narrower than fp32, rounded back to ``x``'s dtype), ``* C**0.5 *
    gamma + bias``, then ``F.silu``. ``weight``/``bias`` (any shapes of ``C`` elements) are
    cast to ``x``'s dtype; ``bias`` None or 0.0 adds nothing. ``input_bias``: normalises
    ``x + input_bias[c]`` (added in ``x``'s dtype, as a conv's bias would have been)."""
    bias = _as_bias(bias)
    if input_bias is not None:
        x = x + _channel_view(input_bias, x)
    xn = x.float() if x.dtype.itemsize < 4 else x
    y = F.normalize(xn, dim=1, eps=eps).to(x.dtype) * x.shape[1] ** 0.5 * _channel_view(weight, x)
    if bias is not None:
        y = y + _channel_view(bias, x)
    if silu:
        y = F.silu(y)
    return y


# ----------------------------------------------------------------------------------- kernel
if triton is not None:

    @triton.jit
    def _to_acc(v, F64: tl.constexpr):
        """``v`` in the accumulation dtype: float64 for float64 x, else fp32."""
        if F64:
            return v.to(tl.float64)
        else:
            return v.to(tl.float32)

    @triton.jit
    def _silu(y):
        # exp's argument capped at 80: no overflow (masked lanes can hold anything); below
        # -80 the result is y * 1.8e-35 instead of about y * e^y, both negligible
        return y / (1.0 + tl.exp(tl.minimum(-y, 80.0)))

    @triton.jit
    def _pixel_factor(ss, C, eps, F64: tl.constexpr):
        """``sqrt(C) / max(sqrt(ss), eps)`` per pixel, IEEE-rounded (NaN propagates)."""
        count = tl.zeros_like(ss) + C
        if F64:
            norm = tl.sqrt(ss)
            scale = tl.sqrt(count)
        else:
            norm = tl.sqrt_rn(ss)
            scale = tl.sqrt_rn(count)
        denom = tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)
        if F64:
            return scale / denom
        else:
            return tl.div_rn(scale, denom)

    @triton.jit
    def _tile(c, pbase, pmask, C, S, CL: tl.constexpr):
        """int64 offsets and mask of the ``[len(c), BLOCK_P]`` tile of channels ``c`` at the
        pixels whose channel-0 offsets are ``pbase``."""
        if CL:
            cofs = c.to(tl.int64)
        else:
            cofs = c.to(tl.int64) * S
        off = cofs[:, None] + pbase[None, :]
        mask = (c < C)[:, None] & pmask[None, :]
        return off, mask

    @triton.jit
    def _load(x_ptr, off, mask, ib_ptr, c, C, HAS_IB: tl.constexpr, F64: tl.constexpr):
        """x (+ input_bias[c]) in the accumulation type. Masked channels read 0 (x and the
        bias both); a masked pixel may hold the bias, but its sum of squares and output are
        its own, and never stored."""
        v = _to_acc(tl.load(x_ptr + off, mask=mask, other=0.0), F64)
        if HAS_IB:
            v = v + _to_acc(tl.load(ib_ptr + c, mask=c < C, other=0.0), F64)[:, None]
        return v

    @triton.jit
    def _write(
        v,
        a,
        c,
        off,
        mask,
        w_ptr,
        b_ptr,
        y_ptr,
        C,
        HAS_B: tl.constexpr,
        SILU: tl.constexpr,
        F64: tl.constexpr,
    ):
        """y = silu?(v * a[pixel] * gamma[c] + bias[c]), stored in y's dtype."""
        cmask = c < C
        g = _to_acc(tl.load(w_ptr + c, mask=cmask, other=0.0), F64)
        y = v * a[None, :] * g[:, None]
        if HAS_B:
            y = y + _to_acc(tl.load(b_ptr + c, mask=cmask, other=0.0), F64)[:, None]
        if SILU:
            y = _silu(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,  # (N, C, *spatial) input: contiguous, or channels-last when CL
        w_ptr,  # (C,) gamma, x's dtype or fp32
        b_ptr,  # (C,) bias, x's dtype or fp32 (x when not HAS_B: never read)
        ib_ptr,  # (C,) input bias, x's dtype or fp32 (x when not HAS_IB: never read)
        y_ptr,  # (N, C, *spatial) output in x's dtype and layout
        C,
        S,  # pixels per sample
        rows,  # CL: N * S pixel rows; contiguous: cdiv(S, BLOCK_P) tiles per sample
        eps,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        CL: tl.constexpr,
        ONE_BLOCK: tl.constexpr,  # C <= BLOCK_C: one read of x, from registers
        HAS_B: tl.constexpr,
        HAS_IB: tl.constexpr,
        SILU: tl.constexpr,
        F64: tl.constexpr,  # float64 x: accumulate in float64
    ):
        """Grid (tiles,): one program normalises BLOCK_P pixels over all C channels."""
        pid = tl.program_id(0)
        dp = tl.arange(0, BLOCK_P)
        dc = tl.arange(0, BLOCK_C)
        if CL:  # one flat run of N * S rows of C channels
            pix = pid.to(tl.int64) * BLOCK_P + dp
            pmask = pix < rows
            pbase = pix * C
        else:  # sample n's C planes of S pixels
            n = pid // rows
            pix = (pid - n * rows) * BLOCK_P + dp  # int32: S < MAX_PIXELS
            pmask = pix < S
            pbase = n.to(tl.int64) * C * S + pix
        if ONE_BLOCK:
            off, mask = _tile(dc, pbase, pmask, C, S, CL)
            v = _load(x_ptr, off, mask, ib_ptr, dc, C, HAS_IB, F64)
            a = _pixel_factor(tl.sum(v * v, axis=0), C, eps, F64)
            _write(v, a, dc, off, mask, w_ptr, b_ptr, y_ptr, C, HAS_B, SILU, F64)
        else:
            ss = _to_acc(tl.zeros([BLOCK_P], dtype=tl.float32), F64)
            for c0 in range(0, C, BLOCK_C):
                off, mask = _tile(c0 + dc, pbase, pmask, C, S, CL)
                v = _load(x_ptr, off, mask, ib_ptr, c0 + dc, C, HAS_IB, F64)
                ss += tl.sum(v * v, axis=0)
            a = _pixel_factor(ss, C, eps, F64)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + dc
                off, mask = _tile(c, pbase, pmask, C, S, CL)
                v = _load(x_ptr, off, mask, ib_ptr, c, C, HAS_IB, F64)
                _write(v, a, c, off, mask, w_ptr, b_ptr, y_ptr, C, HAS_B, SILU, F64)


# ------------------------------------------------------------------------------------ host
def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernel (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


class Plan(NamedTuple):
    """What the launcher runs for one shape (module header, "Launch rule")."""

    block_c: int
    block_p: int
    num_warps: int
    one_block: bool


@functools.lru_cache(maxsize=1024)
def plan(
    c: int,
    channels_last: bool,
    itemsize: int = 2,
    vector: bool = True,
    *,
    interpret: bool = False,
    input_bias: bool = False,
) -> Plan:
    """The launch rule for ``c`` channels of ``itemsize``-byte values in either layout.
    ``vector``: the contiguous axis is 16-byte vectorisable (x and y 16-byte aligned and
    ``C`` (channels-last) or ``S`` (contiguous) divisible by 16, what Triton's JIT specialises
    on); ``interpret`` selects the interpreter's constants. ``input_bias``: the bias takes a
    register per value too, so no thread holds more than ``per_thread`` values: where the
    warp cap would leave more (the contiguous fp16/bf16 tile of 1024 channels), the channel
    block is halved, and the channel loop runs (it spilled on sm_80/sm_90 otherwise)."""
    max_c = INTERPRET_MAX_BLOCK_C if interpret else MAX_BLOCK_C
    tile = INTERPRET_TILE if interpret else TILE
    if itemsize > 4:
        tile //= 2
    row_bytes = INTERPRET_MIN_ROW_BYTES if interpret else MIN_ROW_BYTES
    if not vector:
        row_bytes //= 2
    # values per thread: halved for float64 (two registers each) and for scalar accesses
    # (an address per value)
    per_thread = VALUES_PER_THREAD // (2 if itemsize > 4 else 1) // (1 if vector else 2)
    block_c = max(MIN_BLOCK_C, min(_next_pow2(c), max_c))
    while True:
        block_p = max(tile // block_c, 1 if channels_last else max(row_bytes // itemsize, 1))
        if not input_bias or block_c <= MIN_BLOCK_C:
            break
        if block_c * block_p <= 32 * per_thread * MAX_WARPS:
            break
        block_c //= 2
    warps = max(1, min(block_c * block_p // (32 * per_thread), MAX_WARPS))
    return Plan(block_c, block_p, warps, c <= block_c)


def _layout(x: torch.Tensor) -> str | None:
    """ "contiguous", "channels_last" (channels innermost, pixels dense in order), or None."""
    if x.is_contiguous():
        return "contiguous"
    if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return "channels_last"
    return None


def _check_channel_arg(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        extra = ", None or 0.0" if name == "bias" else ""
        raise TypeError(f"{name} must be a torch.Tensor{extra}, got {type(t).__name__}")
    c = x.shape[1]
    if t.numel() != c:
        raise ValueError(
            f"{name} must have {c} elements (one per channel of x {tuple(x.shape)}), got "
            f"shape {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")


def _check(x, weight, bias, eps, input_bias=None) -> None:
    """Raise a ValueError/TypeError naming the argument for every bad input (``bias`` already
    through ``_as_bias``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"x must have rank 3 to 5 (N, C, 1 to 3 spatial dims), got shape {tuple(x.shape)}"
        )
    _check_channel_arg("weight", weight, x)
    for name, t in (("bias", bias), ("input_bias", input_bias)):
        if t is not None:
            _check_channel_arg(name, t, x)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def not_supported_reasons(x, weight, bias=None, eps=1e-12, *, silu=False,
                          input_bias=None) -> list[str]:  # fmt: skip
    """Why ``rms_norm`` would run the eager reference instead of the Triton kernel for these
    arguments (empty list: the kernel runs). Bad arguments raise instead."""
    bias = _as_bias(bias)
    _check(x, weight, bias, eps, input_bias)
    reasons = []
    if TRITON_ERROR is not None:
        reasons.append(TRITON_ERROR)
    if x.device.type == "cpu" and not interpreting():
        reasons.append("x is on cpu and TRITON_INTERPRET is not 1: the eager reference runs")
    elif x.device.type not in ("cuda", "cpu"):
        reasons.append(f"x is on {x.device}: the kernel runs on CUDA (or the interpreter)")
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of fp32/fp16/bf16/fp64")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, input_bias)
    ):
        reasons.append("an input requires grad: the (differentiable) eager reference runs")
    if x.shape[2:].numel() >= MAX_PIXELS:
        reasons.append("2^31 - 2^16 pixels per sample or more: pixel indices are int32")
    return reasons


def _out_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``rms_norm``'s output for ``x``: x's own when x is dense in either
    layout, else contiguous."""
    if _layout(x) is not None:
        return x.stride()
    return torch.empty(x.shape, device="meta").stride()


def _check_out(out, x) -> None:
    """``out`` for ``rms_norm(..., out=)``: x's shape, dtype and device, and the output's
    strides (``_out_strides``); it may be x itself."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got shape "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    want = _out_strides(x)
    if out.stride() != want:
        raise ValueError(
            f"out must have the strides {tuple(want)} (x's, or contiguous when x is neither "
            f"contiguous nor channels-last), got {tuple(out.stride())}"
        )


def _launch(x, weight, bias, eps, silu, out=None, input_bias=None) -> torch.Tensor:
    """Run the kernel on validated input. ``out`` (x's strides) receives y and may be x
    itself: every program reads the values it overwrites before writing them (the second
    channel loop reads each block before it writes that block)."""
    layout = _layout(x)
    if layout is None:
        x = x.contiguous()
        layout = "contiguous"
    y = torch.empty_like(x) if out is None else out  # x is dense: its strides are kept
    if x.numel() == 0:
        return y
    n, c = x.shape[0], x.shape[1]
    s = x.shape[2:].numel()
    cl = layout == "channels_last" or s == 1  # S == 1: both layouts are rows of C values
    vector = (c if cl else s) % 16 == 0 and x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0
    p = plan(c, cl, x.element_size(), vector, interpret=x.device.type != "cuda",
             input_bias=input_bias is not None)  # fmt: skip
    rows = n * s if cl else triton.cdiv(s, p.block_p)
    tiles = triton.cdiv(n * s, p.block_p) if cl else n * rows
    # dense (C,) vectors: the kernel reads element c at offset c (a strided view would not be)
    w = weight.reshape(-1).contiguous()
    b = bias.reshape(-1).contiguous() if bias is not None else x
    ib = input_bias.reshape(-1).contiguous() if input_bias is not None else x
    on_other_gpu = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if on_other_gpu else contextlib.nullcontext():
        _rms_norm_kernel[(tiles,)](
            x, w, b, ib, y, c, s, rows, float(eps),
            BLOCK_C=p.block_c, BLOCK_P=p.block_p, CL=cl, ONE_BLOCK=p.one_block,
            HAS_B=bias is not None, HAS_IB=input_bias is not None, SILU=bool(silu),
            F64=x.dtype == torch.float64,
            num_warps=p.num_warps,
        )  # fmt: skip
    return y


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    """The output for ``x``: its strides when dense in either layout, else contiguous."""
    return torch.empty_like(x) if _layout(x) is not None else x.new_empty(x.shape)


def _forward(x, weight, bias, eps, silu, out=None, input_bias=None) -> torch.Tensor:
    if not not_supported_reasons(x, weight, bias, eps, silu=silu, input_bias=input_bias):
        return _launch(x, weight, bias, eps, silu, out, input_bias)
    y = rms_norm_reference(x, weight, bias, eps=eps, silu=silu, input_bias=input_bias)
    if out is None and y.stride() != _out_strides(x):  # the reference's layout may differ
        out = _empty_out(x)
    return y if out is None else out.copy_(y)


# -------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("sdvae::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    with torch.no_grad():
        return _forward(x, weight, bias, eps, silu, input_bias=input_bias)


@_rms_norm_op.register_fake
def _(x, weight, bias, eps, silu, input_bias=None):
    _check(x, weight, bias, eps, input_bias)
    return _empty_out(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, silu, input_bias = inputs
    ctx.save_for_backward(x, weight, bias, input_bias)
    ctx.args = (eps, silu)


def _backward(ctx, grad):
    eps, silu = ctx.args
    needs = ctx.needs_input_grad  # per op input: x, weight, bias, eps, silu, input_bias
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(needs[i])
            for i, t in zip((0, 1, 2, 5), ctx.saved_tensors)
        ]
        x, weight, bias, input_bias = leaves
        y = rms_norm_reference(x, weight, bias, eps=eps, silu=silu, input_bias=input_bias)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(y, wrt, grad) if wrt else ())
    grads = [next(got) if t is not None and t.requires_grad else None for t in leaves]
    return (*grads[:3], None, None, grads[3])


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight, bias=None, *, eps=1e-12, silu=False, out=None, input_bias=None):
    """``WanRMS_norm`` over the channels (dim 1) of ``x`` (N, C, 1 to 3 spatial dims), with
    optional fused SiLU; same dtype and memory format out as ``x``. ``weight`` (gamma) and
    ``bias``: any shape of C elements, x's dtype or fp32; ``bias`` None or 0.0 for none.
    ``input_bias`` (C elements, x's dtype or fp32): normalises ``x + input_bias[c]`` (a
    producing conv's bias, added in the kernel's loads).

    ``out``: where to write y (x's shape, dtype and strides); ``out=x`` normalises in place.
    Not with inputs that require grad.

    CUDA tensors run the Triton kernel; CPU tensors run ``rms_norm_reference`` unless
    ``TRITON_INTERPRET=1``; inputs requiring grad (with grad mode on) run the reference.
    Also available as ``torch.ops.sdvae.rms_norm(x, weight, bias, eps, silu, input_bias)``.
    """
    bias = _as_bias(bias)
    _check(x, weight, bias, eps, input_bias)
    if out is not None:
        _check_out(out, x)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, input_bias)
        ):
            raise ValueError("out= is for inference: an input requires grad")
    if torch.compiler.is_compiling():
        y = torch.ops.sdvae.rms_norm(x, weight, bias, float(eps), bool(silu), input_bias)
        return y if out is None else out.copy_(y)
    return _forward(x, weight, bias, eps, silu, out, input_bias)
