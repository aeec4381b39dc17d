"""pytest-benchmark suite for ``group_norm_silu`` and ``group_norm_fused`` (the cases of
sdvae/bench/cases_group_norm.py).

Run on a GPU: ``.venv/bin/python -m pytest bench/bench_group_norm.py --benchmark-only``.
Skipped without one; not collected by ``make test`` (which runs tests/ only). ``sdvae bench
group_norm_silu group_norm_fused`` times the same cases with CUDA events and writes DESIGN.md's
CSV. Each sdvae row records the launch plan the kernel picked in ``extra_info["plan"]``.
"""

from __future__ import annotations

import pytest
import torch

from sdvae.bench import cases_group_norm as cases
from sdvae.bench.engine import Context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

PROVIDERS = ["eager", *cases.COMPILE_PROVIDERS, "sdvae"]


@pytest.mark.parametrize("fused", [False, True], ids=["silu", "fused"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", cases.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", cases.SHAPES, ids=[f"{c}x{hw}x{hw}" for c, hw in cases.SHAPES])
def test_group_norm(benchmark, shape, dtype, layout, provider, fused):
    ctx = Context(device=torch.device("cuda"), quick=False)
    case = cases.make_case(ctx, *shape, dtype, layout, provider, fused=fused)
    case.fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()

    def call():
        case.fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=50, warmup_rounds=5)
    benchmark.extra_info["gbps"] = case.nbytes / benchmark.stats.stats.median / 1e9
    if provider == "sdvae":
        from sdvae.kernels.group_norm import describe_plan

        x = torch.empty(1, shape[0], shape[1], shape[1], device="cuda", dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        benchmark.extra_info["plan"] = describe_plan(x, cases.GROUPS, fused_inputs=fused)
