"""pytest-benchmark suite for ``group_norm_silu`` (the cases of sdvae/bench/cases_group_norm.py).

Run on a GPU: ``.venv/bin/python -m pytest bench/bench_group_norm.py --benchmark-only``.
Skipped without one; not collected by ``make test`` (which runs tests/ only). ``sdvae bench
group_norm_silu`` times the same cases with CUDA events and writes DESIGN.md's CSV.
"""

from __future__ import annotations

import pytest
import torch

from sdvae.bench import cases_group_norm as cases
from sdvae.bench.engine import Context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.parametrize("provider", ["eager", "compile", "sdvae"])
@pytest.mark.parametrize("layout", cases.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", cases.SHAPES, ids=[f"{c}x{hw}x{hw}" for c, hw in cases.SHAPES])
def test_group_norm_silu(benchmark, shape, dtype, layout, provider):
    ctx = Context(device=torch.device("cuda"), quick=False)
    case = cases.make_case(ctx, *shape, dtype, layout, provider)
    case.fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()

    def call():
        case.fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=50, warmup_rounds=5)
    benchmark.extra_info["gbps"] = case.nbytes / benchmark.stats.stats.median / 1e9
