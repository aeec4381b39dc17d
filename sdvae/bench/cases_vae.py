"""Whole-model benches: ``decode`` and ``encode``.

Providers: ``eager`` = diffusers' stock ``AutoencoderKL`` with the same (random) weights,
``compile`` = ``torch.compile`` of that (GPU only; mode ``ctx.compile_mode``, by default
``max-autotune-no-cudagraphs``), ``sdvae`` = ``sdvae.VAE`` (switched onto
the fused kernels by ``sdvae.optimize`` where that exists). TFLOP/s counts the model's FLOPs
with ``torch.utils.flop_counter``. On a GPU, ``decode`` also reports the peak memory of a
2048² decode for eager and sdvae.
"""

from __future__ import annotations

import torch

from ..config import VAEConfig
from ..model import VAE
from .engine import Case, Context, register


def _diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _sizes(ctx: Context):
    return (64,) if ctx.quick else (512, 1024)


def _dtypes(ctx: Context):
    default = (torch.float32,) if not ctx.is_cuda else (torch.float16, torch.bfloat16)
    return tuple(d for d in default if ctx.wants(d)) if ctx.dtypes is None else ctx.dtypes


def _models(ctx: Context, dtype: torch.dtype):
    import sdvae

    torch.manual_seed(0)
    vae = VAE(VAEConfig()).to(ctx.device, dtype).eval()
    akl = sdvae.to_diffusers(vae) if _diffusers_available() else None
    fast = VAE(VAEConfig()).to(ctx.device, dtype).eval()
    fast.load_state_dict(vae.state_dict())
    fast = sdvae.optimize(fast)
    return vae, akl, fast


def _run_suite(ctx: Context, which: str):
    for dtype in _dtypes(ctx):
        ref, akl, fast = _models(ctx, dtype)
        sf = fast.config.scaling_factor
        layout = "channels_last" if ctx.is_cuda else "nchw"  # what optimize() runs in
        for size in _sizes(ctx):
            compiled = None
            if ctx.is_cuda and akl is not None:
                # One static graph per (dtype, size): no dynamic-shape recompile is timed.
                torch._dynamo.reset()
                compiled = torch.compile(
                    akl.decode if which == "decode" else akl.encode,
                    mode=ctx.compile_mode,
                    dynamic=False,
                )
            gen = torch.Generator(device="cpu").manual_seed(size)
            if which == "decode":
                x = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(ctx.device, dtype)
                shape = f"1x4x{size // 8}x{size // 8} -> {size}x{size}"

                def eager(m=akl, x=x, sf=sf):
                    return m.decode(x / sf).sample

                def comp(m=compiled, x=x, sf=sf):
                    return m(x / sf).sample

                def ours(m=fast, x=x):
                    return m.decode(x)

                def unfused(m=ref, x=x):
                    return m.decode(x)

            else:
                x = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(ctx.device, dtype)
                shape = f"1x3x{size}x{size} -> {size // 8}x{size // 8}"

                def eager(m=akl, x=x, sf=sf):
                    return m.encode(x).latent_dist.sample() * sf

                def comp(m=compiled, x=x, sf=sf):
                    return m(x).latent_dist.sample() * sf

                def ours(m=fast, x=x):
                    return m.encode(x)

                def unfused(m=ref, x=x):
                    return m.encode(x)

            with torch.inference_mode():
                # Counted on the unfused model: the flop counter cannot see into custom ops.
                flops = _count_flops(unfused)
            providers = [("sdvae", ours)]
            if akl is not None:
                providers.insert(0, ("eager", eager))
            if compiled is not None:
                providers.insert(1, ("compile", comp))
            for name, fn in providers:
                lay = layout if name == "sdvae" else "nchw"
                yield Case(which, shape, dtype, lay, name, _inference(fn), flops=flops)
            del compiled
        if which == "decode" and ctx.is_cuda and not ctx.quick:
            yield from _decode_memory(ctx, dtype, akl, fast)
        del ref, akl, fast


def _decode_memory(ctx: Context, dtype, akl, fast, size: int = 2048):
    """Peak memory of one 2048² decode (not timed): the number that decides whether a
    large image fits at all."""
    x = torch.randn(1, 4, size // 8, size // 8, device=ctx.device, dtype=dtype)
    sf = fast.config.scaling_factor
    shape = f"1x4x{size // 8}x{size // 8} -> {size}x{size} (peak memory)"
    if akl is not None:
        yield Case(
            "decode",
            shape,
            dtype,
            "nchw",
            "eager",
            _inference(lambda: akl.decode(x / sf).sample),
            memory_only=True,
        )
    yield Case(
        "decode",
        shape,
        dtype,
        "channels_last",
        "sdvae",
        _inference(lambda: fast.decode(x)),
        memory_only=True,
    )


def _inference(fn):
    def call():
        with torch.inference_mode():
            return fn()

    return call


@register("decode")
def decode_cases(ctx: Context):
    yield from _run_suite(ctx, "decode")


@register("encode")
def encode_cases(ctx: Context):
    yield from _run_suite(ctx, "encode")
