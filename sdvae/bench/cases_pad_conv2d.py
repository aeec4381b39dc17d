"""Bench ``pad_conv2d``: the encoder's stride-2 downsample convs with the (0, 1, 0, 1) pad.

Shapes (batch 1, 3x3 kernel, stride 2, Cin = Cout): 128ch 512²→256², 256ch 256²→128²,
512ch 128²→64² for 512² images, and the 1024² image versions (twice the spatial size).

Providers:
* ``eager``: ``F.pad`` + ``F.conv2d`` (cuDNN on a GPU, oneDNN on the CPU);
* ``cudnn_nopad`` (GPU): ``F.conv2d`` on the unpadded input with padding 0 — one output row and
  column fewer, the same kernel otherwise: the floor this op can hope to reach;
* ``cudnn_cover`` (GPU): cuDNN on the unpadded input with a symmetric padding that covers
  (0, 1, 0, 1) (2, so the windows line up with stride 2), then the first row and column dropped
  and the result made dense: the other way to avoid the padded copy (the C++ CPU path's way);
  it computes (OH+1)(OW+1) outputs and copies the output once;
* ``compile`` (GPU): ``torch.compile`` of the eager code;
* ``sdvae``: ``sdvae.ops.pad_conv2d`` (on a GPU: one cuDNN graph with pre (0, 0) / post (1, 1)
  padding and the bias in its epilogue).

GPU: fp16 and bf16 in channels_last, fp32 in NCHW, 512² and 1024² images. CPU: fp32 NCHW and
bf16 channels_last at the 512²-image shapes only (the C++ CPU path, no Triton involved; about
40 s on 2 cores).
TFLOP/s counts 2·N·Cout·OH·OW·Cin·KH·KW of the outputs each provider computes (cudnn_nopad: one
row and column fewer; cudnn_cover is credited with ours only, its extra ones being waste); GB/s
counts input, weight and output once. On the GPU the fp32 rows run with cuDNN's TF32 off for
every provider (sdvae's graph conv follows the same switch). Weights are channels_last like the
activations (as after ``sdvae.optimize``); a weight in the other layout costs one reorder per
call, not shown here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _tf32
from .engine import Case, Context, register

_PAD = (0, 1, 0, 1)
_STRIDE = 2


def _eager(x, w, b):
    return F.conv2d(F.pad(x, _PAD), w, b, stride=_STRIDE)


def _nopad(x, w, b):
    return F.conv2d(x, w, b, stride=_STRIDE)


def _cover(x, w, b):
    oh = (x.shape[2] + 1 - w.shape[2]) // _STRIDE + 1
    ow = (x.shape[3] + 1 - w.shape[3]) // _STRIDE + 1
    y = F.conv2d(x, w, b, stride=_STRIDE, padding=2)[:, :, 1 : 1 + oh, 1 : 1 + ow]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    return y.contiguous(memory_format=fmt or torch.contiguous_format)


def _strict_fp32(fn):
    """``fn`` run with cuDNN's TF32 off, so the fp32 rows compare true fp32 convolutions
    (torch lets cuDNN convolutions use TF32 by default)."""

    def run():
        with _tf32.switches(False):
            return fn()

    return run


def _shapes(ctx: Context):
    """(channels, input size) pairs."""
    small = [(128, 512), (256, 256), (512, 128)]
    if not ctx.is_cuda:
        return small
    return small + [(c, 2 * s) for c, s in small]


def _variants(ctx: Context):
    """(dtype, memory format, layout name) pairs."""
    if ctx.is_cuda:
        default = [
            (torch.float16, torch.channels_last, "nhwc"),
            (torch.bfloat16, torch.channels_last, "nhwc"),
            (torch.float32, torch.contiguous_format, "nchw"),
        ]
    else:
        default = [
            (torch.float32, torch.contiguous_format, "nchw"),
            (torch.bfloat16, torch.channels_last, "nhwc"),
        ]
    return [v for v in default if ctx.wants(v[0])]


@register("pad_conv2d")
def cases(ctx: Context):
    from .. import ops

    if ctx.is_cuda:
        providers = ["eager", "cudnn_nopad", "cudnn_cover", "compile", "sdvae"]
    else:
        providers = ["eager", "sdvae"]
    for c, size in _shapes(ctx):
        for dtype, fmt, layout in _variants(ctx):
            gen = torch.Generator(device="cpu").manual_seed(c * 10007 + size)
            x = torch.randn(1, c, size, size, generator=gen).to(ctx.device, dtype)
            w = torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5
            w = w.to(ctx.device, dtype)
            b = (torch.randn(c, generator=gen) * 0.1).to(ctx.device, dtype)
            x = x.contiguous(memory_format=fmt)
            w = w.contiguous(memory_format=fmt)
            out = size // 2
            shape = f"1x{c}x{size}x{size} -> {out}x{out}"
            for provider in providers:
                if provider == "eager":
                    fn = lambda x=x, w=w, b=b: _eager(x, w, b)
                elif provider == "cudnn_nopad":
                    fn = lambda x=x, w=w, b=b: _nopad(x, w, b)
                elif provider == "cudnn_cover":
                    fn = lambda x=x, w=w, b=b: _cover(x, w, b)
                elif provider == "compile":
                    torch._dynamo.reset()  # one shape per compile: no recompile limit to hit
                    compiled = torch.compile(_eager)
                    fn = lambda x=x, w=w, b=b, f=compiled: f(x, w, b)
                else:  # sdvae
                    fn = lambda x=x, w=w, b=b: ops.pad_conv2d(x, w, b, stride=_STRIDE, padding=_PAD)
                if ctx.is_cuda and dtype == torch.float32:
                    fn = _strict_fp32(fn)
                # Work actually done: cudnn_nopad computes one output row and column fewer.
                o = out - 1 if provider == "cudnn_nopad" else out
                flops = 2.0 * c * o * o * c * 9
                nbytes = (x.numel() + w.numel() + c * o * o) * x.element_size()
                yield Case(
                    "pad_conv2d", shape, dtype, layout, provider, fn, nbytes=nbytes, flops=flops
                )
            del x, w, b
