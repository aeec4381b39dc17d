"""Whole-model benches: ``decode`` and ``encode``.

Providers (every one sees the same random weights):

* ``eager``: diffusers' stock ``AutoencoderKL``, as a pipeline runs it (NCHW).
* ``compile`` (GPU): ``torch.compile`` of that model moved to channels_last (the faster of
  its two layouts under compile on the H200), mode ``ctx.compile_mode``.
* ``sdvae``: ``sdvae.VAE`` switched onto the fused kernels by ``sdvae.optimize``.
* ``sdvae+compile`` (GPU): ``torch.compile(fullgraph=True)`` of the optimized model's call.
* ``sdvae_graph`` (GPU): ``sdvae.optimize(vae, cuda_graph=True)``, replaying CUDA graphs.

Sizes: ``SDVAE_BENCH_VAE_SIZES`` (image sizes, default ``512,1024`` on a GPU, 64 on the CPU)
at batch 1, plus ``SDVAE_BENCH_VAE_BATCH4`` (default ``512``) at batch 4, each a comma list
(set but empty: none); dtypes of these (SD) rows: ``SDVAE_BENCH_VAE_DTYPES`` (a comma list of
fp16, bf16, fp32; default fp16,bf16 on a GPU, fp32 on the CPU; ``--dtype`` narrows it too);
e.g. ``SDVAE_BENCH_VAE_SIZES=512,1024,2048 SDVAE_BENCH_VAE_BATCH4=512,1024,2048`` for the
whole matrix (each torch.compile provider compiles once per size and dtype, which is what
makes the whole matrix slow). On a GPU, ``decode`` also reports the peak memory of one 2048²
decode for every provider: as extra rows of the 2048² case when it is timed, else for the
providers that need no compile. TFLOP/s counts the unfused model's FLOPs with
``torch.utils.flop_counter`` (it cannot see into custom ops).

FLUX.2 rows (shape labels start with ``flux2``): ``VAEConfig.flux2()`` (random weights and
BatchNorm statistics) at ``SDVAE_BENCH_FLUX2_SIZES`` (default ``1024,2048``: sglang's decoder
shapes, so the GPU run compares with that peer directly; 32 on the CPU), batch 1, in bf16
(the pipeline's dtype; fp32 on the CPU). Every provider computes what the pipeline does:
``eager`` is diffusers' ``AutoencoderKLFlux2`` plus the pipeline's own latent steps (decode:
de-normalize with ``bn``'s statistics, unpatchify, ``vae.decode``; encode: the posterior's
mode, patchify, normalize), ``compile`` that whole call under ``torch.compile``
(channels_last), ``sdvae`` the optimized ``VAE`` on the pipeline's latents (normalization
folded), ``sdvae_graph`` the same replayed from CUDA graphs.
"""

from __future__ import annotations

import copy
import functools
import os

import torch

from ..config import VAEConfig
from ..model import VAE
from .engine import Case, Context, register

MEMORY_SIZE = 2048


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


def _int_list(name: str, default: tuple[int, ...], multiple: int = 8) -> tuple[int, ...]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip():  # set but empty: none
        return ()
    try:
        vals = tuple(int(v) for v in raw.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{name} must be a comma list of image sizes, got {raw!r}") from None
    bad = [v for v in vals if v <= 0 or v % multiple]
    if bad:
        raise ValueError(f"{name}: sizes must be positive multiples of {multiple}, got {bad}")
    return vals


def plan(ctx: Context) -> list[tuple[int, int]]:
    """(batch, image size) pairs to time, in order."""
    if ctx.quick:
        return [(1, 64)]
    sizes = _int_list("SDVAE_BENCH_VAE_SIZES", (512, 1024))
    batch4 = _int_list("SDVAE_BENCH_VAE_BATCH4", (512,))
    return [(1, s) for s in sizes] + [(4, s) for s in batch4]


def flux2_plan(ctx: Context) -> list[tuple[int, int]]:
    """(batch, image size) pairs of the FLUX.2 rows, in order."""
    if ctx.quick:
        return [(1, 32)]
    return [(1, s) for s in _int_list("SDVAE_BENCH_FLUX2_SIZES", (1024, 2048), multiple=16)]


def _flux2_dtypes(ctx: Context):
    if ctx.dtypes is not None:
        return ctx.dtypes
    default = (torch.bfloat16,) if ctx.is_cuda else (torch.float32,)
    return tuple(d for d in default if ctx.wants(d))


def pipeline_calls(akl, cfg: VAEConfig):
    """(encode, decode) of a diffusers model the way a diffusion pipeline runs it, on the
    latents the pipeline's denoiser sees: SD configs sample the posterior and scale
    (``(z - shift) * scale``, inverted before ``decode``); FLUX.2 (``Flux2Pipeline``) takes
    the posterior's mode, patchifies it 2x2 and normalizes it with ``vae.bn``'s running
    statistics, and inverts that before ``decode`` (``pixel_unshuffle`` / ``pixel_shuffle``
    are the pipeline's ``_patchify_latents`` / ``_unpatchify_latents``, which
    ``tests/test_flux2.py`` checks)."""
    import torch.nn.functional as F

    sf, sh = cfg.scaling_factor, cfg.shift_factor
    if not cfg.is_flux2:
        return (
            lambda x: (akl.encode(x).latent_dist.sample() - sh) * sf,
            lambda z: akl.decode(z / sf + sh).sample,
        )

    def stats(dtype):
        mean = akl.bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(akl.bn.running_var.view(1, -1, 1, 1) + akl.config.batch_norm_eps)
        return mean, std.to(dtype)

    def encode(x):
        z = F.pixel_unshuffle(akl.encode(x).latent_dist.mode(), 2)
        mean, std = stats(z.dtype)
        return (z - mean) / std

    def decode(latents):
        mean, std = stats(latents.dtype)
        return akl.decode(F.pixel_shuffle(latents * std + mean, 2)).sample

    return encode, decode


_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _dtypes(ctx: Context):
    """The SD rows' dtypes: ``SDVAE_BENCH_VAE_DTYPES`` (set: those; set but empty: none), else
    fp16 and bf16 on a GPU, fp32 on the CPU; either way only those ``ctx`` wants."""
    raw = os.environ.get("SDVAE_BENCH_VAE_DTYPES")
    if raw is None:
        default = (torch.float32,) if not ctx.is_cuda else (torch.float16, torch.bfloat16)
        return tuple(d for d in default if ctx.wants(d)) if ctx.dtypes is None else ctx.dtypes
    names = [v for v in raw.replace(" ", "").split(",") if v]
    bad = [v for v in names if v not in _DTYPE_NAMES]
    if bad:
        raise ValueError(
            f"SDVAE_BENCH_VAE_DTYPES must be a comma list of {', '.join(_DTYPE_NAMES)}, got {bad}"
        )
    return tuple(_DTYPE_NAMES[v] for v in dict.fromkeys(names) if ctx.wants(_DTYPE_NAMES[v]))


def _models(ctx: Context, dtype: torch.dtype, cfg: VAEConfig | None = None):
    import sdvae

    cfg = VAEConfig() if cfg is None else cfg
    torch.manual_seed(0)
    vae = VAE(cfg).eval()
    if vae.bn is not None:  # FLUX.2: statistics other than BatchNorm's 0 / 1 defaults
        with torch.no_grad():
            vae.bn.running_mean.normal_(0.0, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
    vae = vae.to(ctx.device, dtype)
    akl = sdvae.to_diffusers(vae) if _diffusers_available() else None
    fast = sdvae.optimize(copy.deepcopy(vae))  # a copy: no second random initialisation
    graphed = akl_cl = None
    if ctx.is_cuda:
        graphed = sdvae.optimize(copy.deepcopy(vae), cuda_graph=True)
        if akl is not None:  # the compile provider's own copy, in channels_last
            akl_cl = copy.deepcopy(akl).to(memory_format=torch.channels_last)
    return vae, akl, fast, graphed, akl_cl


def _providers(ctx: Context, which: str, x, models) -> list[tuple[str, str, object]]:
    """(provider, layout, fn) for one input ``x``; compiles happen lazily, on first call."""
    ref, akl, fast, graphed, akl_cl = models
    if fast.config.is_flux2:
        return _flux2_providers(ctx, which, x, models)
    sf = fast.config.scaling_factor
    cl = "channels_last" if ctx.is_cuda else "nchw"  # what optimize() runs in
    if which == "decode":

        def run_akl(m):
            return lambda: m.decode(x / sf).sample

        def run_vae(m):
            return lambda: m.decode(x)

        def akl_call(m):
            return m.decode

    else:

        def run_akl(m):
            return lambda: m.encode(x).latent_dist.sample() * sf

        def run_vae(m):
            return lambda: m.encode(x)

        def akl_call(m):
            return m.encode

    out = []
    if akl is not None:
        out.append(("eager", "nchw", run_akl(akl)))
        if akl_cl is not None:
            comp = torch.compile(akl_call(akl_cl), mode=ctx.compile_mode, dynamic=False)
            if which == "decode":
                out.append(("compile", "channels_last", lambda: comp(x / sf).sample))
            else:
                out.append(("compile", "channels_last", lambda: comp(x).latent_dist.sample() * sf))
    out.append(("sdvae", cl, run_vae(fast)))
    if ctx.is_cuda:
        call = fast.decode if which == "decode" else fast.encode
        comp_fast = torch.compile(call, mode=ctx.compile_mode, dynamic=False, fullgraph=True)
        out.append(("sdvae+compile", cl, lambda: comp_fast(x)))
        out.append(("sdvae_graph", cl, run_vae(graphed)))
    return out


def _flux2_providers(ctx: Context, which: str, x, models) -> list[tuple[str, str, object]]:
    """The FLUX.2 rows' providers, each on the pipeline's latents (see the module doc)."""
    ref, akl, fast, graphed, akl_cl = models
    cl = "channels_last" if ctx.is_cuda else "nchw"
    pick = 0 if which == "encode" else 1
    out = []
    if akl is not None:
        out.append(("eager", "nchw", functools.partial(pipeline_calls(akl, ref.config)[pick], x)))
        if akl_cl is not None:
            comp = torch.compile(
                pipeline_calls(akl_cl, ref.config)[pick], mode=ctx.compile_mode, dynamic=False
            )
            out.append(("compile", "channels_last", lambda: comp(x)))

    def run_vae(m):
        if which == "decode":
            return lambda: m.decode(x)
        return lambda: m.encode(x, sample=False)  # the pipeline encodes the mode

    out.append(("sdvae", cl, run_vae(fast)))
    if ctx.is_cuda:
        out.append(("sdvae_graph", cl, run_vae(graphed)))
    return out


def _input(which: str, batch: int, size: int, ctx: Context, dtype, cfg: VAEConfig | None = None):
    gen = torch.Generator(device="cpu").manual_seed(size * 10 + batch)
    if cfg is not None and cfg.is_flux2:
        c, h = cfg.pipeline_latent_channels, size // cfg.image_factor
        if which == "decode":
            x = torch.randn(batch, c, h, h, generator=gen).to(ctx.device, dtype)
            return x, f"flux2 {batch}x{c}x{h}x{h} -> {size}x{size}"
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(ctx.device, dtype)
        return x, f"flux2 {batch}x3x{size}x{size} -> {c}x{h}x{h}"
    if which == "decode":
        x = torch.randn(batch, 4, size // 8, size // 8, generator=gen).to(ctx.device, dtype)
        return x, f"{batch}x4x{size // 8}x{size // 8} -> {size}x{size}"
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(ctx.device, dtype)
    return x, f"{batch}x3x{size}x{size} -> {size // 8}x{size // 8}"


def _run_suite(ctx: Context, which: str):
    for dtype in _dtypes(ctx):
        models = _models(ctx, dtype)
        ref = models[0]
        timed = plan(ctx)
        for batch, size in timed:
            torch._dynamo.reset()  # one static graph per (dtype, size): no recompile is timed
            x, shape = _input(which, batch, size, ctx, dtype)
            with torch.inference_mode():
                # Counted on the unfused model: the flop counter cannot see into custom ops.
                flops = _count_flops(
                    lambda ref=ref, x=x: ref.decode(x) if which == "decode" else ref.encode(x)
                )
            providers = _providers(ctx, which, x, models)
            for name, lay, fn in providers:
                yield Case(which, shape, dtype, lay, name, _inference(fn), flops=flops)
            if which == "decode" and ctx.is_cuda and (batch, size) == (1, MEMORY_SIZE):
                for name, lay, fn in _memory_providers(providers, models):
                    yield Case(
                        which,
                        f"{shape} (peak memory)",
                        dtype,
                        lay,
                        name,
                        _inference(fn),
                        memory_only=True,
                    )
            del providers
        if which == "decode" and ctx.is_cuda and not ctx.quick and (1, MEMORY_SIZE) not in timed:
            yield from _decode_memory(ctx, dtype, models)
        del models, ref
    yield from _flux2_suite(ctx, which)


def _unfused_flops(ref, which: str, x) -> float:
    """The FLOPs of one call of the unfused model (the counter cannot see into custom ops)."""
    with torch.inference_mode():
        if which == "decode":
            return _count_flops(lambda: ref.decode(x))
        return _count_flops(lambda: ref.encode(x, sample=False))


def _flux2_suite(ctx: Context, which: str):
    cfg = VAEConfig.flux2()
    for dtype in _flux2_dtypes(ctx):
        models = _models(ctx, dtype, cfg)
        for batch, size in flux2_plan(ctx):
            torch._dynamo.reset()
            x, shape = _input(which, batch, size, ctx, dtype, cfg)
            flops = _unfused_flops(models[0], which, x)
            for name, lay, fn in _flux2_providers(ctx, which, x, models):
                yield Case(which, shape, dtype, lay, name, _inference(fn), flops=flops)
        del models


def _decode_memory(ctx: Context, dtype, models, size: int = MEMORY_SIZE):
    """Peak memory of one 2048² decode (not timed) for the providers that need no compile:
    the number that decides whether a large image fits at all."""
    x, shape = _input("decode", 1, size, ctx, dtype)
    providers = [p for p in _providers(ctx, "decode", x, models) if "compile" not in p[0]]
    for name, lay, fn in _memory_providers(providers, models):
        yield Case(
            "decode", f"{shape} (peak memory)", dtype, lay, name, _inference(fn), memory_only=True
        )


def _memory_providers(providers, models):
    """The providers of a peak-memory row. A replayed graph's memory pool was allocated when
    it was captured, before the row's baseline: so the graph provider's row clears its graphs
    first and counts warm-up, capture and replay, what a first call really needs."""
    graphed = models[3]
    out = []
    for name, lay, fn in providers:
        if name == "sdvae_graph":

            def fn(run=fn):
                graphed.enable_cuda_graphs()  # drops its graphs and their memory pool
                return run()

        out.append((name, lay, fn))
    return out


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
