"""GroupNorm benches, batch 1, 32 groups, eps 1e-6, fp16 and bf16, NCHW and channels_last.

* ``group_norm_silu``: ``silu(group_norm(x))``. GB/s counts one read of x and one write of y.
* ``group_norm_fused``: GroupNorm+SiLU of a conv's bias-less output ``x`` plus its bias ``cb``
  plus a residual ``r`` (same shape and layout as x), the sum kept for a later residual add:
  eager ``s = x + cb[:, None, None] + r; y = silu(group_norm(s))`` returning (y, s) against
  ``group_norm(x, ..., silu=True, input_bias=cb, residual=r, return_sum=True)``. GB/s counts
  reads of x and r and writes of y and s.

Shapes are DESIGN.md's GN shapes for 512^2 images (512x64^2, 512x128^2, 512x256^2, 256x256^2,
256x512^2, 128x512^2) and for 1024^2 images (twice the spatial size), each once.

Providers: ``eager``; ``compile`` = ``torch.compile`` of the eager function in mode
``default``, ``compile-max-autotune`` the same in mode ``max-autotune-no-cudagraphs`` (both
on every GPU run; a ``--compile-mode`` other than these two adds ``compile-<mode>``); ``sdvae``.
Every sdvae case logs the launch plan the kernel's rule picked for it (``describe_plan``).

On the CPU the Triton kernel only runs under ``TRITON_INTERPRET=1``; then one tiny fp32 shape
is timed (a smoke test of the suites), otherwise the suites yield nothing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .engine import Case, Context, log, register

BENCH = "group_norm_silu"
BENCH_FUSED = "group_norm_fused"
GROUPS = 32
EPS = 1e-6
SHAPES_512 = ((512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512))
SHAPES_1024 = tuple((c, 2 * hw) for c, hw in SHAPES_512)
#: (channels, height = width), each shape once, smallest tensor first.
SHAPES = tuple(sorted(dict.fromkeys(SHAPES_512 + SHAPES_1024), key=lambda s: (s[0] * s[1] ** 2, s)))
QUICK_SHAPES = ((512, 64), (256, 256))
CPU_SHAPES = ((32, 2),)
LAYOUTS = ("nchw", "channels_last")
#: compile provider -> torch.compile mode
COMPILE_PROVIDERS = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}


def shapes(ctx: Context) -> tuple[tuple[int, int], ...]:
    if ctx.is_cuda:
        return QUICK_SHAPES if ctx.quick else SHAPES
    return CPU_SHAPES if os.environ.get("TRITON_INTERPRET") == "1" else ()


def dtypes(ctx: Context) -> tuple[torch.dtype, ...]:
    if ctx.dtypes is not None:
        return ctx.dtypes
    return (torch.float16, torch.bfloat16) if ctx.is_cuda else (torch.float32,)


def providers(ctx: Context) -> tuple[str, ...]:
    if not ctx.is_cuda:
        return ("eager", "sdvae")
    compiled = list(COMPILE_PROVIDERS)
    if ctx.compile_mode not in COMPILE_PROVIDERS.values():
        compiled.append(f"compile-{ctx.compile_mode}")
    return ("eager", *compiled, "sdvae")


def _compile_mode(provider: str) -> str:
    return COMPILE_PROVIDERS.get(provider) or provider.removeprefix("compile-")


def eager_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def eager_fused(x, conv_bias, residual, weight, bias):
    s = x + conv_bias[:, None, None] + residual
    return F.silu(F.group_norm(s, GROUPS, weight, bias, EPS)), s


def _tensor(gen, channels, hw, ctx, dtype, layout, *, scale=1.5, shift=0.5):
    x = torch.randn(1, channels, hw, hw, generator=gen).mul_(scale).add_(shift)
    x = x.to(ctx.device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_case(
    ctx: Context,
    channels: int,
    hw: int,
    dtype: torch.dtype,
    layout: str,
    provider: str,
    *,
    fused: bool = False,
) -> Case:
    """One timed call; its tensors live as long as the returned Case."""
    gen = torch.Generator(device="cpu").manual_seed(channels * 100003 + hw)
    x = _tensor(gen, channels, hw, ctx, dtype, layout)
    weight = (1 + 0.1 * torch.randn(channels, generator=gen)).to(ctx.device, dtype)
    bias = (0.1 * torch.randn(channels, generator=gen)).to(ctx.device, dtype)
    if fused:
        residual = _tensor(gen, channels, hw, ctx, dtype, layout, scale=1.0, shift=0.0)
        conv_bias = (0.2 * torch.randn(channels, generator=gen)).to(ctx.device, dtype)
        eager, args = eager_fused, (x, conv_bias, residual, weight, bias)
    else:
        eager, args = eager_group_norm_silu, (x, weight, bias)
    if provider == "eager":

        def fn():
            return eager(*args)

    elif provider.startswith("compile"):
        torch._dynamo.reset()  # one specialised graph per case, no recompile limit to hit
        compiled = torch.compile(eager, mode=_compile_mode(provider), dynamic=False)

        def fn():
            return compiled(*args)

    elif provider == "sdvae":
        from sdvae.kernels.group_norm import describe_plan, group_norm

        picked = describe_plan(x, GROUPS, fused_inputs=fused)
        log(f"    group_norm plan for 1x{channels}x{hw}x{hw} {layout}: {picked}")
        if fused:

            def fn():
                return group_norm(
                    x, GROUPS, weight, bias, EPS, silu=True, input_bias=conv_bias,
                    residual=residual, return_sum=True,
                )  # fmt: skip

        else:

            def fn():
                return group_norm(x, GROUPS, weight, bias, EPS, silu=True)

    else:
        raise ValueError(f"unknown provider {provider!r}")
    nbytes = (4 if fused else 2) * x.numel() * x.element_size()
    name = BENCH_FUSED if fused else BENCH
    return Case(name, f"1x{channels}x{hw}x{hw}", dtype, layout, provider, fn, nbytes=nbytes)


def _cases(ctx: Context, fused: bool):
    for channels, hw in shapes(ctx):
        for dtype in dtypes(ctx):
            for layout in LAYOUTS:
                for provider in providers(ctx):
                    yield make_case(ctx, channels, hw, dtype, layout, provider, fused=fused)


@register(BENCH)
def cases(ctx: Context):
    yield from _cases(ctx, fused=False)


@register(BENCH_FUSED)
def cases_fused(ctx: Context):
    yield from _cases(ctx, fused=True)
