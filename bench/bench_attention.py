"""pytest-benchmark suite for ``attention``: the cases of ``sdvae bench attention`` (shared
with the CLI through ``sdvae.bench.cases_attention``), one benchmark each. Needs a GPU; not
collected by ``make test``. Run: ``pytest bench/bench_attention.py --benchmark-only``."""

from __future__ import annotations

import pytest
import torch

from sdvae.bench import cases_attention  # noqa: F401  (registers the suite)
from sdvae.bench.engine import DTYPE_NAMES, Context, suites

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

_CTX = Context(device=torch.device("cuda"), quick=False)


def _ids():
    if not torch.cuda.is_available():
        return []
    return [
        f"{c.shape}-{DTYPE_NAMES[c.dtype]}-{c.provider}"
        for c in suites()["attention"](_CTX)
        if not c.memory_only
    ]


@pytest.mark.parametrize("case_id", _ids())
def test_attention(benchmark, case_id):
    for case in suites()["attention"](_CTX):
        if f"{case.shape}-{DTYPE_NAMES[case.dtype]}-{case.provider}" == case_id:
            break
    case.fn()  # autotune / compile outside the timing
    torch.cuda.synchronize()

    def call():
        case.fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        {"flops": case.flops, "shape": case.shape, "provider": case.provider}
    )
    benchmark.pedantic(call, rounds=20, warmup_rounds=3)
    benchmark.extra_info["tflops"] = case.flops / benchmark.stats.stats.median / 1e12
