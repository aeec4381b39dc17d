"""Large decodes within a memory budget: ``decode_large``.

For each image size the rows compare, on the same random SD weights and latents:

* ``diffusers_tiled``: diffusers' ``AutoencoderKL`` with ``enable_tiling()`` (its own tiles,
  each normalised with its own GroupNorm statistics, overlaps blended): what pipelines run
  for big images today;
* ``sdvae``: ``sdvae.optimize``'s full decode (no budget);
* ``sdvae_stream``: the same model with ``max_memory`` (and ``offload`` where given): the
  exact streamed path (``sdvae.stream``).

Each row has the median time, the call's peak memory (``peak_mem_mb``) and ``max_err``: the
largest absolute pixel difference from the full decode (computed once per size, when the full
decode fits; empty otherwise). On a GPU the sizes are 2048^2 (budget 3.2 GB), 4096^2 (12 GB)
and 8192^2 (12 GB, ``offload="cpu"``), the issue's targets; ``SDVAE_BENCH_LARGE_SIZES``
(a comma list of image sizes) picks others, with the budget of the nearest default. On the
CPU (``make bench``, tests) the sizes are tiny, with budgets of half the full path's
estimate, SD's structure at a quarter of its widths (``CPU_CONFIG``), and peak memory is
counted with ``sdvae.memtrack`` (there the offloaded tensors are in the same memory, so the
offload rows count them too).
"""

from __future__ import annotations

import copy
import os

import torch

from ..config import VAEConfig
from ..model import VAE
from .engine import Case, Context, register

#: (image size, max_memory, offload) on a GPU.
GPU_PLAN = ((2048, "3.2GB", None), (4096, "12GB", None), (8192, "12GB", "cpu"))
#: (image size, offload) on the CPU; the budget is half the full path's estimate.
CPU_PLAN = ((64, None), (64, "cpu"))
#: On the CPU the SD structure at a quarter of its widths (the suite's CPU rows only show that
#: it runs; the GPU rows are the ones that count).
CPU_CONFIG = VAEConfig(block_out_channels=(32, 64, 128, 128))


def plan(ctx: Context) -> list[tuple[int, object, str | None]]:
    """(image size, max_memory, offload) triples to time, in order."""
    if not ctx.is_cuda:
        return [(size, None, off) for size, off in CPU_PLAN]
    raw = os.environ.get("SDVAE_BENCH_LARGE_SIZES")
    if raw is None:
        return list(GPU_PLAN)
    try:
        sizes = [int(v) for v in raw.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(
            f"SDVAE_BENCH_LARGE_SIZES must be a comma list of sizes, got {raw!r}"
        ) from None
    if any(s <= 0 or s % 8 for s in sizes):
        raise ValueError(f"SDVAE_BENCH_LARGE_SIZES: sizes must be positive multiples of 8: {raw}")
    out = []
    for s in sizes:
        _, max_memory, offload = min(GPU_PLAN, key=lambda p, s=s: abs(p[0] - s))
        out.append((s, max_memory, offload))
    return out


def _dtypes(ctx: Context):
    default = (torch.float16, torch.bfloat16) if ctx.is_cuda else (torch.float32,)
    return tuple(d for d in default if ctx.wants(d)) if ctx.dtypes is None else ctx.dtypes


def _diffusers(vae: VAE, latent: int, quick: bool):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return None
    import sdvae

    akl = sdvae.to_diffusers(vae).eval()
    akl.enable_tiling()
    if quick:  # tiles of half the latents, so that the tiny sizes are tiled too
        akl.tile_latent_min_size = latent // 2
        akl.tile_sample_min_size = akl.tile_latent_min_size * vae.config.downsample_factor
    return akl


def _max_err(fn, ref_fn):
    def err():
        ref = ref_fn()
        if ref is None:
            return None
        with torch.inference_mode():
            out = fn()
        return float((out.float() - ref.float()).abs().max())

    return err


@register("decode_large")
def cases(ctx: Context):
    import sdvae

    for dtype in _dtypes(ctx):
        torch.manual_seed(0)
        vae = VAE(VAEConfig() if ctx.is_cuda else CPU_CONFIG).to(ctx.device, dtype).eval()
        fast = sdvae.optimize(copy.deepcopy(vae))
        for size, max_memory, offload in plan(ctx):
            f = vae.config.downsample_factor
            gen = torch.Generator().manual_seed(size)
            z = torch.randn(1, 4, size // f, size // f, generator=gen).to(ctx.device, dtype)
            if max_memory is None:  # the CPU: half the full path's estimated peak
                max_memory = fast.memory_plan(z.shape).full_bytes // 2
            cache: dict = {}

            def reference(z=z, cache=cache, fast=fast):
                """The full decode, once per size (None when it does not fit)."""
                if "ref" not in cache:
                    try:
                        with torch.inference_mode():
                            cache["ref"] = fast.decode(z)
                    except torch.cuda.OutOfMemoryError:
                        cache["ref"] = None
                        torch.cuda.empty_cache()
                return cache["ref"]

            budget = max_memory if isinstance(max_memory, str) else f"{max_memory}B"
            shape = f"1x4x{size // f}x{size // f} -> {size}x{size}"
            label = f"{shape} max_memory={budget}" + (f" offload={offload}" if offload else "")
            layout = "channels_last" if ctx.is_cuda else "nchw"
            akl = _diffusers(vae, size // f, not ctx.is_cuda)
            sf = vae.config.scaling_factor
            runs = []
            if akl is not None:
                runs.append(
                    (
                        "diffusers_tiled",
                        "nchw",
                        lambda akl=akl, z=z, sf=sf: akl.decode(z / sf).sample,
                    )
                )
            runs.append(("sdvae", layout, lambda z=z, fast=fast: fast.decode(z)))
            runs.append(
                (
                    "sdvae_stream",
                    layout,
                    lambda z=z, f=fast, m=max_memory, o=offload: f.decode(
                        z, max_memory=m, offload=o
                    ),
                )
            )
            for provider, lay, fn in runs:
                call = _inference(fn)
                yield Case(
                    "decode_large",
                    label,
                    dtype,
                    lay,
                    provider,
                    call,
                    track_cpu_memory=True,
                    error=None if provider == "sdvae" else _max_err(call, reference),
                )
            cache.clear()


def _inference(fn):
    def call():
        with torch.inference_mode():
            return fn()

    return call
