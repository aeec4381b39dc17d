"""Bench ``conv``: the VAE's stride-1 convolutions with their bias and residual.

Shapes (batch 1): the 3x3 convs Cin = Cout at 512×64², 512×128², 512×256², 256×256², 256×512²,
128×512², 128×1024² (the decoder of a 1024² image; the encoder's mirror runs the same (channels,
size) pairs), each with the resnet block's residual add; the 1x1 shortcuts 512→256 at 512² and
256→128 at 1024² (no residual: their output is the residual of the block's second conv); and
the thin convs at the ends of the model (conv_in / conv_out / quant_conv: 3, 4 or 8 channels on
one side).

Providers (each computes ``conv2d(x, w, padding) + bias (+ residual)`` unless said otherwise):
* ``eager``: ``F.conv2d`` with bias, then ``+ residual`` (what the model did before);
* ``cudnn_bare`` (GPU): ``F.conv2d`` without bias and residual: cuDNN's bare conv, the floor;
* ``graph_bare`` (GPU): ``sdvae.ops.conv2d`` without bias and residual: sdvae's cuDNN graph,
  bare, to compare with ``cudnn_bare`` (same work);
* ``graph_unfused`` (GPU): ``sdvae.ops.conv2d(..., fuse_epilogue=False)``: the bare graph, then
  the bias and the residual added by ATen;
* ``cudnn_epilogue``: ``sdvae.ops.conv2d`` with bias and residual in one cuDNN graph;
* ``sdvae``: the path the model takes; for now the same call as ``cudnn_epilogue``
  (bias and residual fused). When the model moves the bias / residual into the next op's loads,
  this row must change with it.

GPU: fp16 and bf16, channels_last (weights too, as after ``sdvae.optimize``); ``--quick``: the
first three 3x3 shapes and the first shortcut. CPU: fp32 NCHW at small sizes (64×32²,
32×64², a 64→32 1x1 shortcut at 32²), providers eager / cudnn_epilogue / sdvae (the C++ CPU path).
TFLOP/s counts 2·N·Cout·OH·OW·Cin·KH·KW; GB/s counts input, weight, bias, residual and output
once each (the bare rows: input, weight, output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import Case, Context, register

# (Cin, Cout, size, kernel, with residual)
_GPU_SHAPES = [
    (512, 512, 64, 3, True),
    (512, 512, 128, 3, True),
    (512, 512, 256, 3, True),
    (256, 256, 256, 3, True),
    (256, 256, 512, 3, True),
    (128, 128, 512, 3, True),
    (128, 128, 1024, 3, True),
    (512, 256, 512, 1, False),
    (256, 128, 1024, 1, False),
    # The model's thin convs (few channels in NHWC, where cuDNN's graph may refuse or pick a
    # slow engine): decoder conv_in 4->512 at 128², conv_out 128->3 at 1024², encoder
    # conv_in 3->128 at 1024², conv_out 512->8 at 128², quant_conv 8->8 1x1 at 128².
    (4, 512, 128, 3, False),
    (128, 3, 1024, 3, False),
    (3, 128, 1024, 3, False),
    (512, 8, 128, 3, False),
    (8, 8, 128, 1, False),
]
_CPU_SHAPES = [(64, 64, 32, 3, True), (32, 32, 64, 3, True), (64, 32, 32, 1, False)]


# Every conv here pads symmetrically by p = k // 2 (an nn.Conv2d's own padding).


def _eager(x, w, b, r, p):
    y = F.conv2d(x, w, b, padding=p)
    return y if r is None else y + r


def _cudnn_bare(x, w, p):
    return F.conv2d(x, w, padding=p)


def _graph(x, w, b, r, p, fuse_epilogue=True):
    from .. import ops

    return ops.conv2d(x, w, b, padding=(p, p, p, p), residual=r, fuse_epilogue=fuse_epilogue)


def _shapes(ctx: Context):
    if not ctx.is_cuda:
        return _CPU_SHAPES
    if ctx.quick:
        return _GPU_SHAPES[:3] + _GPU_SHAPES[7:8]
    return _GPU_SHAPES


def _variants(ctx: Context):
    if ctx.is_cuda:
        default = [
            (torch.float16, torch.channels_last, "nhwc"),
            (torch.bfloat16, torch.channels_last, "nhwc"),
        ]
    else:
        default = [(torch.float32, torch.contiguous_format, "nchw")]
    return [v for v in default if ctx.wants(v[0])]


@register("conv")
def cases(ctx: Context):
    if ctx.is_cuda:
        providers = [
            "eager",
            "cudnn_bare",
            "graph_bare",
            "graph_unfused",
            "cudnn_epilogue",
            "sdvae",
        ]
    else:
        providers = ["eager", "cudnn_epilogue", "sdvae"]
    for cin, cout, size, k, with_residual in _shapes(ctx):
        pad = k // 2
        for dtype, fmt, layout in _variants(ctx):
            gen = torch.Generator(device="cpu").manual_seed(cin * 7919 + cout * 31 + size + k)
            x = torch.randn(1, cin, size, size, generator=gen).to(ctx.device, dtype)
            w = torch.randn(cout, cin, k, k, generator=gen) / (k * k * cin) ** 0.5
            w = w.to(ctx.device, dtype)
            b = (torch.randn(cout, generator=gen) * 0.1).to(ctx.device, dtype)
            r = None
            if with_residual:
                r = torch.randn(1, cout, size, size, generator=gen).to(ctx.device, dtype)
                r = r.contiguous(memory_format=fmt)
            x = x.contiguous(memory_format=fmt)
            w = w.contiguous(memory_format=fmt)
            shape = f"1x{cin}x{size}x{size} -> {cout} {k}x{k}" + (" +res" if with_residual else "")
            flops = 2.0 * cout * size * size * cin * k * k
            esize = x.element_size()
            full = (x.numel() + w.numel() + cout + 2 * cout * size * size) * esize
            if r is None:
                full -= cout * size * size * esize
            bare = (x.numel() + w.numel() + cout * size * size) * esize
            for provider in providers:
                if provider == "eager":
                    fn = lambda x=x, w=w, b=b, r=r, p=pad: _eager(x, w, b, r, p)
                elif provider == "cudnn_bare":
                    fn = lambda x=x, w=w, p=pad: _cudnn_bare(x, w, p)
                elif provider == "graph_bare":
                    fn = lambda x=x, w=w, p=pad: _graph(x, w, None, None, p)
                elif provider == "graph_unfused":
                    fn = lambda x=x, w=w, b=b, r=r, p=pad: _graph(x, w, b, r, p, False)
                else:  # cudnn_epilogue, sdvae: one graph with bias and residual
                    fn = lambda x=x, w=w, b=b, r=r, p=pad: _graph(x, w, b, r, p)
                nbytes = bare if provider in ("cudnn_bare", "graph_bare") else full
                yield Case("conv", shape, dtype, layout, provider, fn, nbytes=nbytes, flops=flops)
            del x, w, b, r
