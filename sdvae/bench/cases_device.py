"""The device's measured ceilings: a large device-to-device copy (GB/s, bytes read plus
written) and a large fp16/bf16 matrix product (TFLOP/s). GPU only."""

from __future__ import annotations

import torch

from .engine import Case, Context, register


@register("ceiling")
def cases(ctx: Context):
    if not ctx.is_cuda:
        return
    n = 1 << 29  # 1 GiB of fp16
    src = torch.randn(n, device=ctx.device, dtype=torch.float16)
    dst = torch.empty_like(src)
    yield Case(
        "ceiling",
        "copy 1GiB",
        torch.float16,
        "flat",
        "torch",
        lambda d=dst, s=src: d.copy_(s),
        nbytes=4 * n,
    )
    del src, dst
    for dtype in (torch.float16, torch.bfloat16):
        m = 8192
        a = torch.randn(m, m, device=ctx.device, dtype=dtype)
        b = torch.randn(m, m, device=ctx.device, dtype=dtype)
        yield Case(
            "ceiling",
            f"matmul {m}^3",
            dtype,
            "row-major",
            "torch",
            lambda a=a, b=b: a @ b,
            flops=2.0 * m**3,
        )
