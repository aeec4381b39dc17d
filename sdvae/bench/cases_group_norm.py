"""``group_norm_silu``: GroupNorm(32 groups, eps 1e-6) followed by SiLU, batch 1.

Shapes are DESIGN.md's GN shapes for 512^2 images (512x64^2, 512x128^2, 512x256^2, 256x256^2,
256x512^2, 128x512^2) and for 1024^2 images (twice the spatial size), each once. Providers:
``eager`` = ``F.silu(F.group_norm(x))``, ``compile`` = ``torch.compile`` of that (CUDA only),
``sdvae`` = ``sdvae.kernels.group_norm(..., silu=True)``; fp16 and bf16, NCHW and
channels_last. GB/s counts one read of x and one write of y.

On the CPU the Triton kernel only runs under ``TRITON_INTERPRET=1``; then one tiny fp32 shape
is timed (a smoke test of the suite), otherwise the suite yields nothing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .engine import Case, Context, register

BENCH = "group_norm_silu"
GROUPS = 32
EPS = 1e-6
SHAPES_512 = ((512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512))
SHAPES_1024 = tuple((c, 2 * hw) for c, hw in SHAPES_512)
#: (channels, height = width), each shape once, smallest tensor first.
SHAPES = tuple(sorted(dict.fromkeys(SHAPES_512 + SHAPES_1024), key=lambda s: (s[0] * s[1] ** 2, s)))
QUICK_SHAPES = ((512, 64), (256, 256))
CPU_SHAPES = ((32, 2),)
LAYOUTS = ("nchw", "channels_last")


def shapes(ctx: Context) -> tuple[tuple[int, int], ...]:
    if ctx.is_cuda:
        return QUICK_SHAPES if ctx.quick else SHAPES
    return CPU_SHAPES if os.environ.get("TRITON_INTERPRET") == "1" else ()


def dtypes(ctx: Context) -> tuple[torch.dtype, ...]:
    if ctx.dtypes is not None:
        return ctx.dtypes
    return (torch.float16, torch.bfloat16) if ctx.is_cuda else (torch.float32,)


def providers(ctx: Context) -> tuple[str, ...]:
    return ("eager", "compile", "sdvae") if ctx.is_cuda else ("eager", "sdvae")


def eager_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def make_case(
    ctx: Context, channels: int, hw: int, dtype: torch.dtype, layout: str, provider: str
) -> Case:
    """One timed call; its tensors live as long as the returned Case."""
    gen = torch.Generator(device="cpu").manual_seed(channels * 100003 + hw)
    x = torch.randn(1, channels, hw, hw, generator=gen).mul_(1.5).add_(0.5)
    x = x.to(ctx.device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(channels, generator=gen)).to(ctx.device, dtype)
    bias = (0.1 * torch.randn(channels, generator=gen)).to(ctx.device, dtype)
    if provider == "eager":

        def fn():
            return eager_group_norm_silu(x, weight, bias)

    elif provider == "compile":
        torch._dynamo.reset()  # one specialised graph per case, no recompile limit to hit
        compiled = torch.compile(eager_group_norm_silu, dynamic=False)

        def fn():
            return compiled(x, weight, bias)

    elif provider == "sdvae":
        from sdvae.kernels import group_norm

        def fn():
            return group_norm(x, GROUPS, weight, bias, EPS, silu=True)

    else:
        raise ValueError(f"unknown provider {provider!r}")
    nbytes = 2 * x.numel() * x.element_size()
    return Case(BENCH, f"1x{channels}x{hw}x{hw}", dtype, layout, provider, fn, nbytes=nbytes)


@register(BENCH)
def cases(ctx: Context):
    for channels, hw in shapes(ctx):
        for dtype in dtypes(ctx):
            for layout in LAYOUTS:
                for provider in providers(ctx):
                    yield make_case(ctx, channels, hw, dtype, layout, provider)
