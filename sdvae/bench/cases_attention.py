"""``attention`` bench: single-head attention at the VAE's sizes (D = 512).

Providers: ``eager`` = ``F.scaled_dot_product_attention`` (PyTorch picks its backend; at
D = 512 FlashAttention is out and it falls back to the memory-efficient kernel), ``compile`` =
``torch.compile`` of the same call (GPU only), ``matmul_chunked`` (GPU only) = the plain
library baseline every attention must beat: per block of 4096 query rows, one cuBLAS matmul
to fp16/bf16 scores, ``torch.softmax``, one matmul with v; ``sdvae`` =
``sdvae.kernels.attention`` (on CUDA the faster of its two backends, measured once per
shape), and on CUDA each backend forced: ``sdvae_triton`` (the flash kernel) and
``sdvae_chunked`` (``attention_chunked``: fp32 scores and softmax).
TFLOP/s counts 4·B·H·Lq·Lk·D. On CUDA: L = 4096 and 16384, fp16 and bf16, timed; plus
peak-memory rows at L = 65536 (where a materialised score matrix alone is 8 GiB in fp16). On the
CPU the Triton kernel runs only under TRITON_INTERPRET=1, so the suite yields one tiny shape
there and nothing otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .engine import Case, Context, register

D = 512


def _dtypes(ctx: Context):
    default = (torch.float16, torch.bfloat16) if ctx.is_cuda else (torch.float32,)
    return tuple(d for d in default if ctx.wants(d)) if ctx.dtypes is None else ctx.dtypes


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def matmul_chunked(q, k, v, rows: int = 4096):
    """The library baseline (see above): scores in the input dtype, query blocks of ``rows``."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    kt = k.transpose(-2, -1)
    for i in range(0, q.shape[-2], rows):
        s = torch.matmul(q[..., i : i + rows, :], kt) * scale
        out[..., i : i + rows, :] = torch.matmul(torch.softmax(s, dim=-1), v)
    return out


def _forced(backend: str, fn):
    from sdvae.kernels import attention as A

    def run():
        old = os.environ.get(A.BACKEND_ENV)
        os.environ[A.BACKEND_ENV] = backend
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[A.BACKEND_ENV]
            else:
                os.environ[A.BACKEND_ENV] = old

    return run


def _cases_for(ctx: Context, length: int, d: int, dtype: torch.dtype, *, memory_only: bool):
    from sdvae.kernels import attention

    gen = torch.Generator(device="cpu").manual_seed(length)
    q, k, v = (torch.randn(1, 1, length, d, generator=gen).to(ctx.device, dtype) for _ in range(3))
    shape = f"1x1x{length}x{d}"
    flops = 4.0 * length * length * d
    nbytes = 4 * length * d * q.element_size()
    common = {"nbytes": nbytes, "flops": flops, "memory_only": memory_only}
    fns = {"eager": lambda: _sdpa(q, k, v)}
    if ctx.is_cuda:
        compiled = torch.compile(_sdpa)
        fns["compile"] = lambda: compiled(q, k, v)
        fns["matmul_chunked"] = lambda: matmul_chunked(q, k, v)
    fns["sdvae"] = lambda: attention(q, k, v)
    if ctx.is_cuda:
        fns["sdvae_triton"] = _forced("triton", lambda: attention(q, k, v))
        fns["sdvae_chunked"] = _forced("chunked", lambda: attention(q, k, v))
    for provider, fn in fns.items():
        if memory_only:
            # A peak-memory row is one call: compile and autotune (whose benchmarking
            # allocates its own buffers) must happen before it.
            fn()
        yield Case("attention", shape, dtype, "bhld", provider, fn, **common)


@register("attention")
def cases(ctx: Context):
    if ctx.is_cuda:
        lengths = (4096,) if ctx.quick else (4096, 16384)
        for dtype in _dtypes(ctx):
            for length in lengths:
                yield from _cases_for(ctx, length, D, dtype, memory_only=False)
            if not ctx.quick:
                yield from _cases_for(ctx, 65536, D, dtype, memory_only=True)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        for dtype in _dtypes(ctx):
            yield from _cases_for(ctx, 48, 64, dtype, memory_only=False)


# ---------------------------------------------------------------------- the whole block
def _blocks(ctx: Context, channels: int, dtype: torch.dtype):
    """diffusers' mid-block ``Attention`` (as AutoencoderKL builds it) and sdvae's fused
    ``AttentionBlock`` with the same random weights; (None, block) without diffusers."""
    from sdvae.model import AttentionBlock

    torch.manual_seed(channels)
    ours = AttentionBlock(channels, 32, 1e-6)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * (channels**-0.5 if p.dim() == 2 else 0.1))
    theirs = None
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:
        pass
    else:
        theirs = Attention(
            channels,
            heads=1,
            dim_head=channels,
            rescale_output_factor=1.0,
            eps=1e-6,
            norm_num_groups=32,
            spatial_norm_dim=None,
            residual_connection=True,
            bias=True,
            upcast_softmax=True,
            _from_deprecated_attn_block=True,
        )
        theirs.load_state_dict(ours.state_dict())
        theirs = theirs.to(ctx.device, dtype).eval()
    ours = ours.to(ctx.device, dtype).eval()
    ours.fused = True
    ours.group_norm.fused = True
    return theirs, ours


@register("attention_block")
def block_cases(ctx: Context):
    """The mid block's whole attention (GroupNorm, projections, attention, output projection,
    residual) at 1024² and 2048² images (L = 128² and 256² tokens, C = 512): diffusers' block
    (``eager``, and ``compile`` of it) against sdvae's fused block."""
    if ctx.is_cuda:
        sides = (128,) if ctx.quick else (128, 256)
        channels = D
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sides, channels = (6,), 64
    else:
        return
    for dtype in _dtypes(ctx):
        theirs, ours = _blocks(ctx, channels, dtype)
        for side in sides:
            gen = torch.Generator(device="cpu").manual_seed(side)
            x = torch.randn(1, channels, side, side, generator=gen).to(ctx.device, dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            shape = f"1x{channels}x{side}x{side}"
            flops = 4.0 * side**4 * channels + 8.0 * side**2 * channels**2
            fns = {}
            if theirs is not None:
                x_nchw = x.contiguous()
                fns["eager"] = ("nchw", lambda t=theirs, x=x_nchw: t(x))
                if ctx.is_cuda:
                    comp = torch.compile(theirs, dynamic=False)
                    fns["compile"] = ("channels_last", lambda c=comp, x=x: c(x))
            fns["sdvae"] = ("channels_last", lambda o=ours, x=x: o(x))
            for provider, (layout, fn) in fns.items():
                yield Case(
                    "attention_block",
                    shape,
                    dtype,
                    layout,
                    provider,
                    _no_grad(fn),
                    flops=flops,
                    memory_only=False,
                )
                if ctx.is_cuda and side == 256:
                    yield Case(
                        "attention_block",
                        f"{shape} (peak memory)",
                        dtype,
                        layout,
                        provider,
                        _no_grad(fn),
                        memory_only=True,
                    )


def _no_grad(fn):
    def call():
        with torch.inference_mode():
            return fn()

    return call
