"""``vae_sample``: the encoder's sampling step, moments (N, 8, h, w) -> latents (N, 4, h, w).

Providers: ``eager`` = the seed's op chain (``vae_sample_reference``: chunk, clamp, exp,
multiply-add, shift, scale) with ``torch.randn`` for the noise, ``compile`` = ``torch.compile``
of that same function (CUDA only), ``sdvae`` = the fused Triton kernel drawing its noise in the
kernel. GB/s counts the moments read once and the latents written once (the noise that eager
materialises is not counted: it is work the fused kernel does not do).

On CUDA: latents 4x64^2 and 4x128^2 (512^2 and 1024^2 images), batch 1 and 8, fp16 and fp32.
On the CPU the kernel only runs in Triton's interpreter, so the suite yields one tiny shape
there when ``TRITON_INTERPRET=1`` and nothing otherwise.
"""

from __future__ import annotations

import os

import torch

from .engine import Case, Context, register

#: (N, latent channels, h, w) timed on a GPU.
GPU_SHAPES = ((1, 4, 64, 64), (8, 4, 64, 64), (1, 4, 128, 128), (8, 4, 128, 128))
CPU_SHAPES = ((1, 4, 8, 8),)
GPU_DTYPES = (torch.float16, torch.float32)
CPU_DTYPES = (torch.float32,)
SCALING_FACTOR = 0.18215
SHIFT_FACTOR = 0.0


def shape_label(shape: tuple[int, int, int, int]) -> str:
    return "x".join(str(s) for s in shape)


def _make_eager_chain(reference):
    """The seed's sampling step with ``torch.randn`` noise (``reference`` is
    ``vae_sample_reference``, passed in so that listing suites does not import Triton)."""

    def eager_chain(moments: torch.Tensor) -> torch.Tensor:
        n, c2, h, w = moments.shape
        noise = torch.randn((n, c2 // 2, h, w), device=moments.device, dtype=moments.dtype)
        return reference(
            moments, noise, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, sample=True
        )

    return eager_chain


def plan(ctx: Context) -> list[tuple[tuple[int, int, int, int], torch.dtype, str]]:
    """(latent shape, dtype, provider) of every case the suite yields for ``ctx``, in order."""
    if ctx.is_cuda:
        shapes, dtypes, providers = GPU_SHAPES, GPU_DTYPES, ("eager", "compile", "sdvae")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        shapes, dtypes, providers = CPU_SHAPES, CPU_DTYPES, ("eager", "sdvae")
    else:
        return []
    if ctx.dtypes is not None:
        dtypes = tuple(d for d in ctx.dtypes if d in (torch.float16, torch.float32, torch.bfloat16))
    return [(s, d, p) for s in shapes for d in dtypes for p in providers]


@register("vae_sample")
def cases(ctx: Context):
    from sdvae.kernels.vae_sample import vae_sample, vae_sample_reference

    eager_chain = _make_eager_chain(vae_sample_reference)
    compiled = torch.compile(eager_chain, dynamic=False) if ctx.is_cuda else None
    for shape, dtype, provider in plan(ctx):
        n, c, h, w = shape
        gen = torch.Generator(device="cpu").manual_seed(n * 1000 + h)
        moments = torch.randn((n, 2 * c, h, w), generator=gen).to(ctx.device, dtype)
        elt = moments.element_size()
        nbytes = moments.numel() * elt + n * c * h * w * elt
        if provider == "eager":

            def fn(m=moments):
                return eager_chain(m)

        elif provider == "compile":

            def fn(m=moments):
                return compiled(m)

        else:

            def fn(m=moments):
                return vae_sample(m, scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR)

        yield Case("vae_sample", shape_label(shape), dtype, "nchw", provider, fn, nbytes=nbytes)
        del moments, fn
